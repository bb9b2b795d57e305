"""Test head labels causally: does ablating a labelled head hurt what its label says it does?

    >>> scores = lens_attn.score_heads(model, progress=False)
    >>> result = lens_attn.confirm(model, scores, progress=False)  # labels from scores.classify()
    >>> (1, 5) in result.confirmed("induction")
    True

Each label is tested by the ablation it predicts should matter, measured on the probes that need it:

==================  ==================  ===============  =========================================
label               probes              metric           why
==================  ==================  ===============  =========================================
induction           repeated_random     induction_loss   induction predicts the second copy
previous_token      repeated_random     induction_loss   feeds induction (the K-composition half)
previous_token      natural             loss             bigram-like local context in text
duplicate_token     repeated_tokens     loss             finds earlier copies of the current token
attention_sink      natural             loss             the no-op "rest" position of many heads
current_token       natural             loss             keeps the token's own identity
copying             repeated_random     induction_loss   copying the attended token is the right
                                                         prediction there (on repeated_tokens
                                                         probes the next token is random)
(other)             natural             loss             a general test for user-defined labels
==================  ==================  ===============  =========================================

For every (probes, metric) pair needed, one batched ``ablation_sweep`` over every single head gives
each head's ``delta`` (ablated minus clean; positive means the ablation hurts). A labelled head is
**confirmed** for a test when its delta is positive and larger than the median delta of the
*unlabelled* heads (no label at all) of the same layer; ``ratio`` is delta / that median (NaN unless
the median is positive). A layer without unlabelled heads is compared with the unlabelled heads of
every layer; with none anywhere the median is NaN and nothing is confirmed. ``significant`` also
asks that the margin over the median exceed twice the delta's standard error over prompts: with
few prompts or redundant heads (several induction heads backing each other up) a confirmed head's
effect can be within noise, and this column says so.
"""

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lens_attn.ablation.methods import AblationMethod, check_method
from lens_attn.ablation.result import AblationResult
from lens_attn.ablation.sweep import ablation_sweep
from lens_attn.files import load_json, nan_for_null, save_table_and_json
from lens_attn.heads import head_label
from lens_attn.probes import Probe, builtin_probes

LABEL_TESTS: dict[str, tuple[tuple[str, str], ...]] = {
    "induction": (("repeated_random", "induction_loss"),),
    "previous_token": (("repeated_random", "induction_loss"), ("natural", "loss")),
    "duplicate_token": (("repeated_tokens", "loss"),),
    "attention_sink": (("natural", "loss"),),
    "current_token": (("natural", "loss"),),
    "copying": (("repeated_random", "induction_loss"),),
}
DEFAULT_TEST: tuple[tuple[str, str], ...] = (("natural", "loss"),)


@dataclass(frozen=True)
class LabelTest:
    """One labelled head under one test."""

    layer: int
    head: int
    label: str
    probes: str
    metric: str
    baseline: float
    ablated: float
    delta: float
    stderr: float
    median_unlabelled_delta: float
    ratio: float
    confirmed: bool
    significant: bool


@dataclass
class ConfirmResult:
    """Every (labelled head, label, test) with its effect and verdict; the sweeps behind them."""

    tests: list[LabelTest]
    sweeps: dict[str, AblationResult]  # "<probes>/<metric>" -> the sweep
    method: str
    provenance: dict = field(default_factory=dict)

    def confirmed(self, label: str | None = None) -> list[tuple[int, int]]:
        """Heads confirmed on every test of ``label`` (of any label if ``None``)."""
        heads: dict[tuple[int, int], bool] = {}
        for t in self.tests:
            if label is None or t.label == label:
                key = (t.layer, t.head)
                heads[key] = heads.get(key, True) and t.confirmed
        return sorted(h for h, ok in heads.items() if ok)

    def to_dataframe(self):
        import pandas as pd

        columns = list(LabelTest.__dataclass_fields__)
        rows = [{**asdict(t), "unit": head_label(t.layer, t.head)} for t in self.tests]
        return pd.DataFrame(rows, columns=["unit", *columns])

    def save(self, directory: "str | os.PathLike") -> Path:
        """``confirm.csv``, ``confirm.json``, and one sub-directory per sweep."""
        for key, sweep in self.sweeps.items():
            sweep.save(Path(directory) / key.replace("/", "__"))
        payload = {
            "tests": [asdict(t) for t in self.tests],
            "sweeps": list(self.sweeps),
            "method": self.method,
            "provenance": self.provenance,
        }
        return save_table_and_json(directory, "confirm", self.to_dataframe(), payload)

    @classmethod
    def load(cls, directory: "str | os.PathLike") -> "ConfirmResult":
        payload = load_json(directory, "confirm", "ConfirmResult")
        sweeps = {
            key: AblationResult.load(Path(directory) / key.replace("/", "__"))
            for key in payload["sweeps"]
        }
        floats = [k for k, f in LabelTest.__dataclass_fields__.items() if f.type is float]
        # strict JSON wrote NaN (e.g. the stderr of a single prompt) as null
        tests = [
            LabelTest(**{**t, **{k: nan_for_null(t[k]) for k in floats}}) for t in payload["tests"]
        ]
        return cls(tests, sweeps, payload["method"], payload.get("provenance", {}))


def _labels_of(head_scores, labels) -> dict[tuple[int, int], tuple[str, ...]]:
    if labels is None:
        if head_scores is None:
            raise ValueError("give head_scores (HeadScores, classified here) or labels=")
        labels = head_scores.classify()
    labels = getattr(labels, "labels", labels)  # HeadLabels or a plain dict
    if not isinstance(labels, dict):
        raise ValueError("labels must be HeadLabels or a dict {(layer, head): ('induction', ...)}")
    out = {}
    for key, value in labels.items():
        out[(int(key[0]), int(key[1]))] = (value,) if isinstance(value, str) else tuple(value)
    return out


def default_probes(model, *, seed: int = 0) -> dict[str, list[Probe]]:
    """``builtin_probes`` by kind: repeated_random (32), natural (32), repeated_tokens (16)."""
    sets: dict[str, list[Probe]] = {}
    for probe in builtin_probes(model, seed=seed):  # sized to fit the model's context
        sets.setdefault(probe.kind, []).append(probe)
    return sets


def confirm(
    model,
    head_scores=None,
    *,
    labels=None,
    method: AblationMethod = "zero",
    probes: "dict[str, list[Probe]] | None" = None,
    max_batch: int | None = None,
    memory_budget_mb: int | float = 1024,
    seed: int = 0,
    progress: bool = False,
) -> ConfirmResult:
    """Ablate every labelled head and check its effect against the unlabelled heads of its layer.

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge`` in compatibility mode.
        head_scores: ``HeadScores``; its ``classify()`` gives the labels unless ``labels`` is given.
        labels: ``HeadLabels`` or ``{(layer, head): ("induction", ...)}``; heads missing from it or
            with an empty tuple are the unlabelled heads.
        method: the ablation (``zero``, ``mean``, ``resample``, ``bos``, ``uniform``); ``mean`` and
            ``resample`` use each test's own probes as the reference.
        probes: ``{"repeated_random": [...], "natural": [...], "repeated_tokens": [...]}``, or
            ``None`` for ``default_probes(model)``. Only the sets a test needs are used.
        max_batch, memory_budget_mb: passed to ``ablation_sweep``.
        seed: seed of the default probes and of ``resample``.
        progress: show progress bars.
    """
    check_method(method)
    head_labels = _labels_of(head_scores, labels)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    bad = [h for h in head_labels if not (0 <= h[0] < n_layers and 0 <= h[1] < n_heads)]
    if bad:
        raise ValueError(
            f"labelled heads {bad} out of range for {n_layers} layers x {n_heads} heads"
        )
    needed = sorted({test for labs in head_labels.values() for lab in labs for test in _tests(lab)})
    probe_sets = probes if probes is not None else default_probes(model, seed=seed)
    missing = sorted({kind for kind, _ in needed} - set(probe_sets))
    if missing:
        raise ValueError(f"probes has no {missing}; give sets for: {', '.join(probe_sets)}")

    sweeps: dict[str, AblationResult] = {}
    for kind, metric in needed:
        sweeps[f"{kind}/{metric}"] = ablation_sweep(
            model, probe_sets[kind], method=method, metric=metric,
            reference=probe_sets[kind] if method in ("mean", "resample") else None,
            max_batch=max_batch, memory_budget_mb=memory_budget_mb, seed=seed, progress=progress,
        )  # fmt: skip

    unlabelled = [(layer, h) for layer in range(n_layers) for h in range(n_heads)
                  if not head_labels.get((layer, h))]  # fmt: skip
    tests = []
    for (layer, head), labs in sorted(head_labels.items()):
        for lab in labs:
            for kind, metric in _tests(lab):
                sweep = sweeps[f"{kind}/{metric}"]
                tests.append(_verdict(sweep, layer, head, lab, kind, metric, unlabelled))
    return ConfirmResult(tests, sweeps, method, {"seed": seed, "n_unlabelled": len(unlabelled)})


def _tests(label: str) -> tuple[tuple[str, str], ...]:
    return LABEL_TESTS.get(label, DEFAULT_TEST)


def _verdict(sweep: AblationResult, layer, head, label, kind, metric, unlabelled) -> LabelTest:
    grid, err = sweep.grid(), _stderr_grid(sweep)
    same_layer = [grid[h] for h in unlabelled if h[0] == layer]
    pool = same_layer or [grid[h] for h in unlabelled]
    median = float(torch.stack(pool).median()) if pool else math.nan
    delta = float(grid[layer, head])
    ratio = delta / median if median > 0 else math.nan  # NaN for a NaN, zero or negative median
    stderr = float(err[layer, head])
    confirmed = bool(delta > 0 and not math.isnan(median) and delta > median)
    significant = bool(confirmed and delta - median > 2 * stderr)  # NaN stderr: False
    return LabelTest(
        layer, head, label, kind, metric, sweep.baseline, sweep.baseline + delta, delta,
        stderr, median, ratio, confirmed, significant,
    )  # fmt: skip


def _stderr_grid(sweep: AblationResult) -> torch.Tensor:
    grid = torch.full((sweep.n_layers, sweep.n_heads), float("nan"))
    for unit, err in zip(sweep.units, sweep.stderr.tolist(), strict=True):
        if len(unit) == 1:
            grid[unit[0]] = err
    return grid
