"""Typed results of head scoring: ``HeadScores`` (a grid per score) and ``HeadLabels`` (classification).

``HeadScores.classify`` labels a head with every head type whose score passes its threshold:

===================  ===============  ===============  ==================================================
label                score            read on probes   default threshold (override with ``thresholds=``)
===================  ===============  ===============  ==================================================
previous_token       previous_token   natural          >= 0.4 of the head's attention on the previous token
previous_n           previous_n       natural          >= 0.4 on the token k back, for one k in 2..8
induction            induction        repeated_random  >= 0.4 on the token after an earlier copy
duplicate_token      duplicate_token  repeated_tokens  >= 0.4 on earlier copies of the current token
current_token        current_token    natural          >= 0.4 on the query's own position
attention_sink       bos              natural          >= 0.6 on position 0 (BOS) from the other queries
copying              copy_rank        (weights)        >= 0.1 of sampled tokens with their own logit in the
                                                       top 10 of the head's OV row (effective embedding)
copy_suppression     suppress_rank    (weights)        >= 0.1 with their own logit in the bottom 10
successor            successor        (weights)        >= 0.5 of ordinal tokens whose OV row ranks the
                                                       successor first among its sequence
name_mover           name_mover       ioi              >= 0.15 mean attention END -> IO where the head's direct
                                                       effect raises logit(IO) - logit(S)
negative_name_mover  negative_name_   ioi              >= 0.2 the same where it lowers it
                     mover
retrieval            retrieval        retrieval        >= 0.1 of a needle's copy steps with the head's top
                                                       attention on the copied token (Wu et al. 2024)
===================  ===============  ===============  ==================================================

The weight-based scores and their sources are in ``lens_attn.scoring.ov_circuit``. ``copying`` was
once the eigenvalue sign balance of ``W_U W_OV W_E`` >= 0.9 (the score ``copying``, still computed):
on SmolLM2-135M that labelled 52 heads, of which 2 copy >= 10% of tokens by the rank test, and the
three strongest copiers had negative eigenvalue scores (``experiments/taxonomy.md``).
``name_mover`` is 0.15, not 0.2: discover's IOI sentences (``probes.ioi_probes``, six templates)
give lower attention to IO than the three templates of the independent check, which finds SmolLM2's
four name movers at >= 0.2 (L23H0, L28H1, L23H4, L22H7); they read 0.40, 0.20, 0.17, 0.23 here.
The name-mover and retrieval scores are in ``lens_attn.scoring.ioi`` and ``lens_attn.scoring.retrieval``.

Each label is read from the probe set that defines it (``LABEL_PROBES``) when the scores were taken
per probe set (``score_probe_sets``; ``per_probe_set`` holds one ``HeadScores`` per kind), else from
the grid over every probe. Averaging induction over natural text as well as repeated random tokens
halves a real induction head's score (SmolLM2: a head at 0.88 on repeated tokens read 0.51 over all
80 probes). The thresholds are cut-offs on the scores' natural 0..1 scales, checked on the bundled
model and on SmolLM2-135M against an independent measurement (``experiments/label_accuracy.py``;
``experiments/taxonomy.md`` for the labels of issue #26). Confirm labels causally with
``lens_attn.confirm``.
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
    "copying": 0.1,
    "copy_suppression": 0.1,
    "successor": 0.5,
    "previous_n": 0.4,
    "name_mover": 0.15,
    "negative_name_mover": 0.2,
    "retrieval": 0.1,
}
LABEL_SCORE = {  # label -> score it is read from
    "previous_token": "previous_token",
    "induction": "induction",
    "duplicate_token": "duplicate_token",
    "current_token": "current_token",
    "attention_sink": "bos",
    "copying": "copy_rank",
    "copy_suppression": "suppress_rank",
    "successor": "successor",
    "previous_n": "previous_n",
    "name_mover": "name_mover",
    "negative_name_mover": "negative_name_mover",
    "retrieval": "retrieval",
}
LABEL_PROBES = {  # label -> the probe kind its score is read on (None: from the weights)
    "previous_token": "natural",
    "induction": "repeated_random",
    "duplicate_token": "repeated_tokens",
    "current_token": "natural",
    "attention_sink": "natural",
    "copying": None,
    "copy_suppression": None,
    "successor": None,
    "previous_n": "natural",
    "name_mover": "ioi",
    "negative_name_mover": "ioi",
    "retrieval": "retrieval",
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
    ``per_probe_set[kind]`` is the same result on one probe kind alone (``score_probe_sets``).
    """

    values: dict[str, Float[Tensor, "layer head_index"]]
    stderr: dict[str, Float[Tensor, "layer head_index"]]
    counts: dict[str, Float[Tensor, "layer head_index"]] = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    per_probe_set: "dict[str, HeadScores]" = field(default_factory=dict)

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

    def label_score(self, label: str) -> Float[Tensor, "layer head_index"]:
        """The grid ``label`` is read from: its score on its defining probe set where there is one."""
        score, kind = LABEL_SCORE[label], LABEL_PROBES.get(label)
        if kind in self.per_probe_set and score in self.per_probe_set[kind].values:
            return self.per_probe_set[kind].values[score]
        return self[score]

    def classify(self, thresholds: dict[str, float] | None = None) -> HeadLabels:
        """Label each head with every type whose score reaches its threshold (see module docstring)."""
        merged = dict(DEFAULT_THRESHOLDS)
        for label, value in (thresholds or {}).items():
            if label not in DEFAULT_THRESHOLDS:
                raise ValueError(f"unknown label {label!r}; valid: {', '.join(DEFAULT_THRESHOLDS)}")
            merged[label] = _threshold(label, value)
        labels: dict[tuple[int, int], tuple[str, ...]] = {}
        grids = {lab: self.label_score(lab) for lab in merged if LABEL_SCORE[lab] in self.values}
        for layer in range(self.n_layers):
            for head in range(self.n_heads):
                labels[(layer, head)] = tuple(
                    label
                    for label, threshold in merged.items()
                    if LABEL_SCORE[label] in self.values
                    and float(grids[label][layer, head]) >= threshold
                )
        return HeadLabels(labels, merged)

    def _payload(self) -> dict:
        return {
            "values": {k: v.tolist() for k, v in self.values.items()},
            "stderr": {k: v.tolist() for k, v in self.stderr.items()},
            "counts": {k: v.tolist() for k, v in self.counts.items()},
            "provenance": self.provenance,
            "per_probe_set": {k: v._payload() for k, v in self.per_probe_set.items()},
        }

    @classmethod
    def _from_payload(cls, payload: dict) -> "HeadScores":
        def grids(d):  # strict JSON wrote NaN as null
            return {k: torch.tensor(nan_for_null(v), dtype=torch.float32) for k, v in d.items()}

        return cls(
            grids(payload["values"]),
            grids(payload["stderr"]),
            grids(payload.get("counts", {})),
            payload.get("provenance", {}),
            {k: cls._from_payload(v) for k, v in payload.get("per_probe_set", {}).items()},
        )

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``scores.csv`` (one row per head; ``<score>@<kind>`` columns per probe set) and
        ``scores.json`` (grids, per-probe-set grids, provenance)."""
        table = self.to_dataframe()
        for kind, sub in self.per_probe_set.items():
            for name, grid in sub.values.items():
                table[f"{name}@{kind}"] = grid.flatten().tolist()
        return save_table_and_json(directory, "scores", table, self._payload())

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "HeadScores":
        payload = load_json(directory, "scores", "HeadScores", required=("values", "stderr"))
        if not all(isinstance(payload[key], dict) for key in ("values", "stderr")):
            raise InputError(
                f"{Path(directory) / 'scores.json'} was not written by HeadScores.save: its values "
                "and stderr must be objects mapping score names to grids"
            )
        return cls._from_payload(payload)
