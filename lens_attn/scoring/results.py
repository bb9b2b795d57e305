"""Typed results of head scoring: ``HeadScores`` (a grid per score) and ``HeadLabels`` (classification).

``HeadScores.classify`` labels a head with every head type whose score passes its threshold:

=================  ==================  =======================================================
label              score               default threshold (override with ``thresholds=``)
=================  ==================  =======================================================
previous_token     previous_token      >= 0.4 of the head's attention on the previous token
induction          induction           >= 0.4 on the token after an earlier copy of the current
duplicate_token    duplicate_token     >= 0.4 on earlier copies of the current token
current_token      current_token       >= 0.4 on the query's own position
attention_sink     bos                 >= 0.6 on position 0 (BOS) from the other queries
copying            copying             >= 0.7 eigenvalue sign balance of the OV circuit
=================  ==================  =======================================================

The thresholds are deliberately simple cut-offs on the scores' natural 0..1 scales; they were chosen so
a head that puts most of its attention on one pattern gets the label, and a head that merely leans
towards it does not. Confirm labels causally with ``lens_attn.confirm``.
"""

import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from lens_attn.errors import InputError
from lens_attn.files import load_json, nan_for_null, save_table_and_json
from lens_attn.heads import head_label

DEFAULT_THRESHOLDS: dict[str, float] = {
    "previous_token": 0.4,
    "induction": 0.4,
    "duplicate_token": 0.4,
    "current_token": 0.4,
    "attention_sink": 0.6,
    "copying": 0.7,
}
LABEL_SCORE = {  # label -> score it is read from
    "previous_token": "previous_token",
    "induction": "induction",
    "duplicate_token": "duplicate_token",
    "current_token": "current_token",
    "attention_sink": "bos",
    "copying": "copying",
}


def _threshold(label: str, value) -> float:
    """A classify threshold: a finite number >= 0 (scores are on 0..1 scales)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        if not (isinstance(value, torch.Tensor) and value.numel() == 1):
            raise InputError(
                f"threshold for {label!r} must be a number, got {type(value).__name__} {value!r}"
            )
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise InputError(
            f"threshold for {label!r} must be a finite number >= 0 (scores are on 0..1 "
            f"scales), got {number}"
        )
    return number


@dataclass
class HeadLabels:
    """Labels per head; a head may carry several (``("induction", "previous_token")``) or none."""

    labels: dict[tuple[int, int], tuple[str, ...]]
    thresholds: dict[str, float]

    def heads_with(self, label: str) -> list[tuple[int, int]]:
        if label not in self.thresholds:
            raise ValueError(f"unknown label {label!r}; valid: {', '.join(self.thresholds)}")
        return [head for head, labels in sorted(self.labels.items()) if label in labels]

    def to_dataframe(self):
        import pandas as pd

        rows = [
            {
                "layer": layer,
                "head": head,
                "unit": head_label(layer, head),
                "labels": ";".join(labels),
            }
            for (layer, head), labels in sorted(self.labels.items())
        ]
        return pd.DataFrame(rows, columns=["layer", "head", "unit", "labels"])


@dataclass
class HeadScores:
    """Every requested score for every head, as ``[layer, head_index]`` grids.

    ``values[name][layer, head]`` is the score; ``stderr[name]`` its standard error over prompts
    (NaN where a score is not a mean over prompts, e.g. the weight-based ``copying``). ``counts[name]``
    is the number of prompts that contributed (prompts without a target row for that score don't).
    """

    values: dict[str, Float[Tensor, "layer head_index"]]
    stderr: dict[str, Float[Tensor, "layer head_index"]]
    counts: dict[str, Float[Tensor, "layer head_index"]] = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.values)

    @property
    def n_layers(self) -> int:
        return next(iter(self.values.values())).shape[0]

    @property
    def n_heads(self) -> int:
        return next(iter(self.values.values())).shape[1]

    def __getitem__(self, name: str) -> Float[Tensor, "layer head_index"]:
        return self.values[self.check_score(name)]

    def check_score(self, name: str) -> str:
        """``name`` if this result has that score, else ValueError listing the scores it has."""
        if name not in self.values:
            raise ValueError(f"no score named {name!r}; this result has: {', '.join(self.values)}")
        return name

    def to_dataframe(self):
        """One row per head: ``layer, head, unit ("L1H3"), <score...>, <score>_stderr...``."""
        import pandas as pd

        rows = []
        for layer in range(self.n_layers):
            for head in range(self.n_heads):
                row = {"layer": layer, "head": head, "unit": head_label(layer, head)}
                row.update({name: float(v[layer, head]) for name, v in self.values.items()})
                row.update(
                    {f"{name}_stderr": float(v[layer, head]) for name, v in self.stderr.items()}
                )
                rows.append(row)
        return pd.DataFrame(rows)

    def top(self, score: str, k: int = 5, *, largest: bool = True) -> list[tuple[int, int, float]]:
        """The ``k`` heads with the highest (or lowest) ``score``, as ``(layer, head, value)``.

        Heads without a value (NaN: not scored, ``score_heads(..., heads=...)``) are never listed."""
        grid = self.values[self.check_score(score)].flatten()
        n_scored = int((~torch.isnan(grid)).sum())
        grid = torch.where(
            torch.isnan(grid), torch.tensor(-math.inf if largest else math.inf), grid
        )
        order = torch.argsort(grid, descending=largest)[: max(0, min(k, n_scored))]
        return [(int(i) // self.n_heads, int(i) % self.n_heads, float(grid[i])) for i in order]

    def classify(self, thresholds: dict[str, float] | None = None) -> HeadLabels:
        """Label each head with every type whose score reaches its threshold (see module docstring)."""
        merged = dict(DEFAULT_THRESHOLDS)
        for label, value in (thresholds or {}).items():
            if label not in DEFAULT_THRESHOLDS:
                raise ValueError(f"unknown label {label!r}; valid: {', '.join(DEFAULT_THRESHOLDS)}")
            merged[label] = _threshold(label, value)
        labels: dict[tuple[int, int], tuple[str, ...]] = {}
        for layer in range(self.n_layers):
            for head in range(self.n_heads):
                labels[(layer, head)] = tuple(
                    label
                    for label, threshold in merged.items()
                    if LABEL_SCORE[label] in self.values
                    and float(self.values[LABEL_SCORE[label]][layer, head]) >= threshold
                )
        return HeadLabels(labels, merged)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``scores.csv`` (one row per head) and ``scores.json`` (grids + provenance)."""
        payload = {
            "values": {k: v.tolist() for k, v in self.values.items()},
            "stderr": {k: v.tolist() for k, v in self.stderr.items()},
            "counts": {k: v.tolist() for k, v in self.counts.items()},
            "provenance": self.provenance,
        }
        return save_table_and_json(directory, "scores", self.to_dataframe(), payload)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "HeadScores":
        payload = load_json(directory, "scores", "HeadScores", required=("values", "stderr"))
        if not all(isinstance(payload[key], dict) for key in ("values", "stderr")):
            raise InputError(
                f"{Path(directory) / 'scores.json'} was not written by HeadScores.save: its values "
                "and stderr must be objects mapping score names to grids"
            )

        def grids(d):  # strict JSON wrote NaN as null
            return {k: torch.tensor(nan_for_null(v), dtype=torch.float32) for k, v in d.items()}

        return cls(
            grids(payload["values"]),
            grids(payload["stderr"]),
            grids(payload.get("counts", {})),
            payload.get("provenance", {}),
        )
