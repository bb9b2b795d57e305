"""``AblationResult``: the metric under each ablated unit, per prompt; its table, grid and files."""

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from lens_attn.files import load_json, nan_for_null, save_table_and_json
from lens_attn.heads import unit_label
from lens_attn.probes import Probe, probe_hash


@dataclass
class AblationResult:
    """The metric under each ablation ("unit": one head, a layer, a group), per prompt.

    ``delta = ablated - baseline`` (positive for a loss means the ablation hurts); ``stderr`` is the
    standard error over prompts of the per-prompt delta (paired), NaN with one prompt.

    ``to_dataframe()`` has one row per unit: ``unit`` (``"L1H3"``, ``"L1"`` for a whole layer,
    ``"L1H0+L1H1"`` for a group), ``layer`` (-1 if the unit spans layers), ``head`` (-1 unless the
    unit is one head), ``baseline, ablated, delta, stderr``. ``estimate`` is True for attribution
    patching (``lens_attn.attribution_patching``), whose deltas are linear estimates.
    """

    units: list[list[tuple[int, int]]]
    baseline_per_prompt: Float[Tensor, " prompt"]
    ablated_per_prompt: Float[Tensor, "unit prompt"]
    n_layers: int
    n_heads: int
    method: str
    metric: str
    estimate: bool = False
    provenance: dict = field(default_factory=dict)

    @property
    def baseline(self) -> float:
        return float(self.baseline_per_prompt.mean())

    @property
    def ablated(self) -> Float[Tensor, " unit"]:
        return self.ablated_per_prompt.mean(dim=1)

    @property
    def delta(self) -> Float[Tensor, " unit"]:
        return (self.ablated_per_prompt - self.baseline_per_prompt[None]).mean(dim=1)

    @property
    def stderr(self) -> Float[Tensor, " unit"]:
        n = self.baseline_per_prompt.shape[0]
        if n < 2:
            return torch.full((len(self.units),), float("nan"))
        diff = self.ablated_per_prompt - self.baseline_per_prompt[None]
        return diff.std(dim=1) / math.sqrt(n)

    @property
    def labels(self) -> list[str]:
        return [unit_label(unit, self.n_heads) for unit in self.units]

    def to_dataframe(self):
        import pandas as pd

        rows = []
        for unit, label, ablated, delta, err in zip(
            self.units,
            self.labels,
            self.ablated.tolist(),
            self.delta.tolist(),
            self.stderr.tolist(),
            strict=True,
        ):
            layers = {layer for layer, _ in unit}
            rows.append({
                "unit": label,
                "layer": unit[0][0] if len(layers) == 1 else -1,
                "head": unit[0][1] if len(unit) == 1 else -1,
                "baseline": self.baseline, "ablated": ablated, "delta": delta, "stderr": err,
            })  # fmt: skip
        return pd.DataFrame(
            rows, columns=["unit", "layer", "head", "baseline", "ablated", "delta", "stderr"]
        )

    def grid(self) -> Float[Tensor, "layer head_index"]:
        """Deltas of single-head units as ``[layer, head_index]``; NaN where a head wasn't ablated.

        Layer and group units are left out (a layer sweep gives an all-NaN grid: use ``delta``).
        """
        grid = torch.full((self.n_layers, self.n_heads), float("nan"))
        for unit, delta in zip(self.units, self.delta.tolist(), strict=True):
            if len(unit) == 1:
                grid[unit[0]] = delta
        return grid

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` units with the largest delta, as ``(label, delta)``."""
        order = torch.argsort(self.delta, descending=True)[:k]
        return [(self.labels[i], float(self.delta[i])) for i in order]

    def save(self, directory: "str | os.PathLike") -> Path:
        """Write ``ablation.csv`` (the dataframe) and ``ablation.json`` (everything, per prompt)."""
        payload = {
            "units": self.units, "n_layers": self.n_layers, "n_heads": self.n_heads,
            "method": self.method, "metric": self.metric, "estimate": self.estimate,
            "provenance": self.provenance,
            "baseline_per_prompt": self.baseline_per_prompt.tolist(),
            "ablated_per_prompt": self.ablated_per_prompt.tolist(),
        }  # fmt: skip
        return save_table_and_json(directory, "ablation", self.to_dataframe(), payload)

    @classmethod
    def load(cls, directory: "str | os.PathLike") -> "AblationResult":
        p = load_json(directory, "ablation", "AblationResult")
        n_prompts = len(p["baseline_per_prompt"])
        return cls(
            units=[[(int(layer), int(head)) for layer, head in unit] for unit in p["units"]],
            baseline_per_prompt=torch.tensor(nan_for_null(p["baseline_per_prompt"])),
            ablated_per_prompt=torch.tensor(nan_for_null(p["ablated_per_prompt"])).reshape(
                -1, n_prompts
            ),
            n_layers=p["n_layers"], n_heads=p["n_heads"], method=p["method"], metric=p["metric"],
            estimate=p["estimate"], provenance=p.get("provenance", {}),
        )  # fmt: skip


def provenance(model, probes: list[Probe], **extra) -> dict:
    import lens_attn

    return {
        "model": getattr(model.cfg, "model_name", None), "probe_hash": probe_hash(probes),
        "n_prompts": len(probes), "lens_attn_version": lens_attn.__version__, **extra,
    }  # fmt: skip
