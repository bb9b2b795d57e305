"""Test head labels causally: does ablating a labelled head hurt what its label says it does?

    >>> scores = lens_attn.score_heads(model, progress=False)
    >>> result = lens_attn.confirm(model, scores, progress=False)  # labels from scores.classify()
    >>> (1, 5) in result.confirmed("induction")
    True

Each label is tested by the ablation it predicts should matter, measured on the probes that need it:

==================  ==================  ===============  ======  ===================================
label               probes              metric           path    why
==================  ==================  ===============  ======  ===================================
induction           repeated_random     induction_loss   total   induction predicts the second copy
previous_token      repeated_random     induction_loss   total   feeds induction (K-composition)
duplicate_token     ioi                 logit_diff       total   marks the repeated name (the
                                                                 subject) so that later heads
                                                                 choose the other one
attention_sink      natural             loss             total   a resting head: ablating it is
                                                                 benign
current_token       natural             loss             total   keeps the token's own identity
copying             repeated_random     induction_loss   direct  its OV circuit writes the attended
                                                                 token into the logits: on the
                                                                 second copy that is the answer
copy_suppression    repeated_random     copy_logprob     direct  ablated, the copy gets likelier
successor           ordinal             loss             total   writes the next day, month, number
previous_n          natural             loss             total   carries the token k back
name_mover          ioi                 logit_diff       direct  copies IO (Wang et al. 2022)
negative_name_mover ioi                 logit_diff       direct  writes against IO (harm: a drop)
retrieval           retrieval           induction_loss   total   copies the needle (Wu et al. 2024)
(other)             natural             loss             total   a general test for user-defined
                                                                 labels
==================  ==================  ===============  ======  ===================================

``path``: ``total`` ablates the head everywhere (``ablation_sweep``); ``direct`` takes its output
out of the final residual stream only (``ablation_sweep(direct=True)``), later layers still reading
it. copying is a claim about the direct path (Elhage et al.'s ``W_E W_OV W_U``): on SmolLM2 its 52
heads zero-ablated outright raise every loss tried *less* than random same-layer sets (repeated
tokens +0.23 vs +1.2..+3.9 nats; induction +1.2 vs +5.9..+10.7); their direct path alone costs
+0.72 nats of induction loss while random same-layer sets' direct paths cost at most -0.03. On
repeated-token probes (pool of 20) the attended token is the answer only by chance: there the
bundled model's copying (= induction) heads' direct path lowers the loss.

duplicate_token is tested where Wang et al. 2022 found such heads at work, on indirect-object
sentences (``lens_attn.probes.ioi_probes``), by the drop of the logit difference between the
indirect object and the repeated subject. On SmolLM2 its 2 heads raised no loss more than random
same-layer sets (repeated tokens +0.12 vs up to +0.14 nats); on discover's 32 IOI sentences they
lower the logit difference by 0.83 together, random same-layer sets by at most 0.40, and by 0.28
(L14H3) and 0.46 (L8H1) alone. A model whose vocabulary has no two one-token names gets the old
test, repeated tokens' loss (``FALLBACK_TESTS``). For a metric where higher is better (``logit_diff``) "hurts" below means
"lowers" (``metrics.harm_sign``); ``group_null_max`` is then the lowest random set's delta.

previous_token is not tested on natural text's loss: on SmolLM2 its 5 heads together cost +0.18
nats there while random 5-head sets of the same layers cost up to +0.50; what the label predicts
is the induction circuit it feeds. Null sets never hold a head whose label is measured on the
same probes and metric, on either path (so copying's null sets hold no induction heads).

Each test asks a question the label can answer even when heads back each other up (the plan in
``lens_attn.ablation.plan`` lists what is ablated; nothing else is):

1. **group**: the label's heads ablated together hurt the metric more than every one of ``n_null``
   random size-matched sets from the same layers (``group_p`` = rank p-value, 1 / (n_null + 1) at
   best). A label that fails here is confirmed for none of its heads.
2. per head, **single**: the head alone hurts more than twice its standard error over prompts and
   more than the median of ``n_null`` random unlabelled heads of the same layers alone; or
   **context**: with the rest of the group ablated, ablating this head too hurts more than twice the
   paired standard error (``context_delta = delta(group) - delta(group minus head)``): the head
   carries the label's effect once its backups are gone.

A head is **confirmed** for a test when the group passes and single or context does;
``decided_by`` names the test that decided (``group`` when the group failed). ``significant``: the
group beat every null set and the deciding per-head effect clears 2 standard errors with room
(its lower 2-sigma bound above the null).

A benign label (``attention_sink``, a resting head) claims the opposite: its ablation changes the
loss by less than ``benign_bound`` nats. If the whole group's ablation does, every head is
confirmed (``decided_by="group_benign"``); otherwise each head alone is held to the bound
(``single_benign``); ``significant`` asks the bound to hold at 2 standard errors.
"""

import functools
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lens_attn import probes as _probes
from lens_attn.ablation.methods import AblationMethod, check_method
from lens_attn.ablation.metrics import harm_sign
from lens_attn.ablation.plan import BENIGN_LABELS, Test, plan_confirm, test_key
from lens_attn.ablation.result import AblationResult
from lens_attn.ablation.sweep import ablation_sweep
from lens_attn.files import load_json, nan_for_null, save_table_and_json
from lens_attn.heads import head_label
from lens_attn.probes import Probe, builtin_probes, group_by_kind

LABEL_TESTS: dict[str, tuple[Test, ...]] = {  # label -> (probes, metric, path) of each test
    "induction": (("repeated_random", "induction_loss", "total"),),
    "previous_token": (("repeated_random", "induction_loss", "total"),),
    "duplicate_token": (("ioi", "logit_diff", "total"),),
    "attention_sink": (("natural", "loss", "total"),),
    "current_token": (("natural", "loss", "total"),),
    "copying": (("repeated_random", "induction_loss", "direct"),),
    "copy_suppression": (("repeated_random", "copy_logprob", "direct"),),
    "successor": (("ordinal", "loss", "total"),),
    "previous_n": (("natural", "loss", "total"),),
    "name_mover": (("ioi", "logit_diff", "direct"),),
    "negative_name_mover": (("ioi", "logit_diff", "direct"),),
    "retrieval": (("retrieval", "induction_loss", "total"),),
}
DEFAULT_TEST: tuple[Test, ...] = (("natural", "loss", "total"),)
CONFIRM_ONLY_PROBES = ("ioi", "ordinal", "retrieval")  # kinds only confirm reads (<kind>_probes)
# a label's tests where its probes can't be built for the model (no one-token names: no ioi)
FALLBACK_TESTS: dict[str, tuple[Test, ...]] = {
    "duplicate_token": (("repeated_tokens", "loss", "total"),),
    "successor": DEFAULT_TEST,
    "name_mover": DEFAULT_TEST,
    "negative_name_mover": DEFAULT_TEST,
    "retrieval": DEFAULT_TEST,
}


@dataclass(frozen=True)
class LabelTest:
    """One labelled head under one test (module docstring)."""

    layer: int
    head: int
    label: str
    probes: str
    metric: str
    path: str  # total | direct (module docstring)
    baseline: float
    ablated: float  # baseline + delta: the head alone ablated
    delta: float
    stderr: float
    null_single_delta: float  # median of random unlabelled heads alone (NaN for benign labels)
    context_delta: float  # delta(group) - delta(group minus this head); NaN for a group of one
    context_stderr: float
    group_delta: float
    group_null_max: float  # the most harmful random same-size set's delta (NaN: benign labels)
    group_p: float
    confirmed: bool
    significant: bool
    decided_by: str  # group | single | context | group_benign | single_benign

    @property
    def test(self) -> Test:
        """``(probes, metric, path)``: the test, as ``LABEL_TESTS`` lists it."""
        return (self.probes, self.metric, self.path)


@dataclass
class ConfirmResult:
    """Every (labelled head, label, test) with its effect and verdict; the sweeps behind them."""

    tests: list[LabelTest]
    sweeps: dict[str, AblationResult]  # plan.test_key: "<probes>/<metric>[/direct]" -> the sweep
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
        tests = [  # runs before the direct path have no "path": every test was a total one
            LabelTest(**{"path": "total", **t, **{k: nan_for_null(t[k]) for k in floats}})
            for t in payload["tests"]
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
    """``builtin_probes`` by kind (repeated_random 32, natural 32, repeated_tokens 16, sized to
    the context) and ``CONFIRM_ONLY_PROBES``: ioi (48), ordinal (32), retrieval (8) if made."""
    sets = group_by_kind(builtin_probes(model, seed=seed))
    made = {k: getattr(_probes, f"{k}_probes")(model, seed=seed) for k in CONFIRM_ONLY_PROBES}
    return {**sets, **{kind: probes for kind, probes in made.items() if probes}}


def label_tests(label: str, kinds=None) -> tuple[Test, ...]:
    """``label``'s tests (``LABEL_TESTS``, ``DEFAULT_TEST``): ``FALLBACK_TESTS`` where ``kinds``
    (the probe kinds at hand) lacks a kind they need."""
    tests = LABEL_TESTS.get(label, DEFAULT_TEST)
    if kinds is not None and label in FALLBACK_TESTS and any(k not in kinds for k, _, _ in tests):
        return FALLBACK_TESTS[label]
    return tests


def confirm(
    model,
    head_scores=None,
    *,
    labels=None,
    method: AblationMethod = "zero",
    probes: "dict[str, list[Probe]] | None" = None,
    n_null: int = 8,
    benign_bound: float = 0.05,
    max_prompts: int | None = None,
    max_batch: int | None = None,
    memory_budget_mb: int | float = 1024,
    seed: int = 0,
    plan=None,
    progress: bool = False,
) -> ConfirmResult:
    """Test every label: its heads together against random sets, then each head (module docstring).

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge`` in compatibility mode.
        head_scores: ``HeadScores``; its ``classify()`` gives the labels unless ``labels`` is given.
        labels: ``HeadLabels`` or ``{(layer, head): ("induction", ...)}``; heads missing from it or
            with an empty tuple are the unlabelled heads.
        method: the ablation (``zero``, ``mean``, ``resample``, ``bos``, ``uniform``); ``mean`` and
            ``resample`` use each test's own probes as the reference.
        probes: ``{"repeated_random": [...], "natural": [...], "repeated_tokens": [...],
            "ioi": [...]}``, or ``None`` for ``default_probes(model)``. Only the sets a test needs
            are used.
        n_null: random size-matched sets (and random single heads) each label is compared with.
        benign_bound: nats within which a benign label's ablation must leave the loss.
        max_prompts: use at most this many prompts of each set (evenly spaced), or all.
        max_batch, memory_budget_mb: passed to ``ablation_sweep``.
        seed: seed of the default probes, of the random sets and of ``resample``.
        plan: a ``ConfirmPlan`` from ``plan_confirm`` (built here if ``None``).
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
    probe_sets = probes if probes is not None else default_probes(model, seed=seed)
    tests_of = functools.partial(label_tests, kinds=frozenset(probe_sets))
    needed = sorted(
        {test for labs in head_labels.values() for lab in labs for test in tests_of(lab)}
    )
    missing = sorted({kind for kind, _, _ in needed} - set(probe_sets))
    if missing:
        raise ValueError(f"probes has no {missing}; give sets for: {', '.join(probe_sets)}")
    probe_sets = {k: _subsample(v, max_prompts) for k, v in probe_sets.items()}
    if plan is None:
        plan = plan_confirm(model, head_labels, probe_sets, tests_of=tests_of, n_null=n_null,
                            memory_budget_mb=memory_budget_mb, seed=seed)  # fmt: skip

    def sweep(test: Test, units) -> AblationResult:
        kind, metric, path = test
        return ablation_sweep(
            model, probe_sets[kind], method=method, metric=metric, heads=[list(u) for u in units],
            reference=probe_sets[kind] if method in ("mean", "resample") else None,
            max_batch=max_batch, memory_budget_mb=memory_budget_mb, seed=seed,
            direct=path == "direct", progress=progress,
        )  # fmt: skip

    sweeps: dict[str, AblationResult] = {}
    index: dict[Test, dict] = {}
    for test, planned in plan.tests.items():  # one sweep per test: one clean run per prompt chunk
        units = list(planned.units)
        sweeps[test_key(test)] = sweep(test, units)
        index[test] = {u: i for i, u in enumerate(units)}

    for test in plan.tests:  # benign layers that were not benign: each head alone
        key, idx = test_key(test), index[test]
        effects = _Effects(sweeps[key], idx)
        extra = [u for label, per_test in plan.roles.items() if label in BENIGN_LABELS
                 and test in per_test
                 for lg in per_test[test]["layer_group"]
                 if abs(effects.delta(lg)[0]) >= benign_bound
                 for u in per_test[test]["single_if_needed"]
                 if u[0] in lg and u not in idx]  # fmt: skip
        if extra:
            sweeps[key] = _concat([sweeps[key], sweep(test, extra)])
            idx.update({u: len(idx) + i for i, u in enumerate(extra)})

    tests = []
    for label, per_test in plan.roles.items():
        for test, roles in per_test.items():
            effects = _Effects(sweeps[test_key(test)], index[test])
            verdict = _benign_verdicts if label in BENIGN_LABELS else _verdicts
            tests += verdict(effects, label, test, roles, benign_bound)
    tests.sort(key=lambda t: (t.layer, t.head, t.label, t.probes, t.metric, t.path))
    n_unlabelled = sum(1 for layer in range(n_layers) for h in range(n_heads)
                       if not head_labels.get((layer, h)))  # fmt: skip
    info = {"seed": seed, "n_unlabelled": n_unlabelled, "n_null": n_null,
            "benign_bound": benign_bound, "passes": plan.passes,
            "prompts": {k: len(v) for k, v in probe_sets.items()}}  # fmt: skip
    return ConfirmResult(tests, sweeps, method, info)


def _concat(parts: list[AblationResult]) -> AblationResult:
    """One result with the units of ``parts`` (sweeps of the same prompts) in order."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    return AblationResult(
        [u for p in parts for u in p.units], first.baseline_per_prompt,
        torch.cat([p.ablated_per_prompt for p in parts]), first.n_layers, first.n_heads,
        first.method, first.metric,
        provenance={**first.provenance, "path": "+".join(p.provenance.get("path", "?") for p in parts)},
    )  # fmt: skip


def _subsample(probes: list[Probe], n: int | None) -> list[Probe]:
    if n is None or len(probes) <= n:
        return list(probes)
    step = len(probes) / n
    return [probes[int(i * step)] for i in range(n)]


class _Effects:
    """Per-unit deltas of one sweep, looked up by unit; paired differences with their stderr."""

    def __init__(self, sweep: AblationResult, index: dict):
        self.sweep, self.index = sweep, index
        self.diff = sweep.ablated_per_prompt - sweep.baseline_per_prompt[None]  # [unit, prompt]

    def delta(self, unit) -> tuple[float, float]:
        return _mean_se(self.diff[self.index[unit]])

    def minus(self, a, b) -> tuple[float, float]:
        return _mean_se(self.diff[self.index[a]] - self.diff[self.index[b]])


def _mean_se(x: torch.Tensor) -> tuple[float, float]:
    n = x.shape[0]
    se = float(x.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan
    return float(x.mean()), se


def _verdicts(effects: _Effects, label, test: Test, roles, _bound) -> list[LabelTest]:
    sign = harm_sign(test[1])  # the comparisons below are on sign * delta: positive hurts
    group = roles["group"][0]
    group_delta, _ = effects.delta(group)
    nulls = [effects.delta(u)[0] for u in roles["null"]]
    null_max = sign * max(sign * d for d in nulls) if nulls else math.nan  # the most harmful
    group_p = (1 + sum(sign * d >= sign * group_delta for d in nulls)) / (1 + len(nulls))
    group_ok = bool(nulls) and sign * group_delta > sign * null_max
    singles = [effects.delta(u)[0] for u in roles["null_single"]]
    null_single = float(torch.tensor(singles).median()) if singles else math.nan
    tested = [u[0] for u in roles["single"]]
    rest = dict(zip(tested, roles["context"], strict=False)) if roles["context"] else {}
    out = []
    for head in group:
        if (head,) not in effects.index or head not in {u[0] for u in roles["single"]}:
            baseline = effects.sweep.baseline
            out.append(LabelTest(
                head[0], head[1], label, *test, baseline, math.nan, math.nan, math.nan,
                null_single, math.nan, math.nan, group_delta, null_max, group_p,
                bool(group_ok), False, "group_only",
            ))  # fmt: skip
            continue
        delta, se = effects.delta((head,))
        if head in rest:
            context, context_se = effects.minus(group, rest[head])
        else:
            context, context_se = math.nan, math.nan
        floor = sign * null_single if not math.isnan(null_single) else 0.0
        harm, context_harm = sign * delta, sign * context
        single_ok = harm > 2 * se and harm > floor
        context_ok = context_harm > 2 * context_se  # NaN: False
        confirmed = group_ok and (single_ok or context_ok)
        decided = "group" if not group_ok else "single" if single_ok else "context"
        if decided == "single":
            significant = group_ok and harm - 2 * se > floor and group_p <= 0.2
        else:
            significant = confirmed and context_harm - 2 * context_se > 0 and group_p <= 0.2
        baseline = effects.sweep.baseline
        out.append(LabelTest(
            head[0], head[1], label, *test, baseline, baseline + delta, delta, se,
            null_single, context, context_se, group_delta, null_max, group_p,
            bool(confirmed), bool(significant), decided,
        ))  # fmt: skip
    return out


def _benign_verdicts(effects: _Effects, label, test: Test, roles, bound) -> list[LabelTest]:
    group = roles["group"][0]
    group_delta, _ = effects.delta(group)
    out = []
    for layer_group in roles["layer_group"]:
        lg_delta, lg_se = effects.delta(layer_group)
        for head in layer_group:
            if abs(lg_delta) < bound:
                delta, se, decided = lg_delta, lg_se, "group_benign"
            elif (head,) in effects.index:
                delta, se = effects.delta((head,))
                decided = "single_benign"
            else:  # past the plan's max_heads: the layer's group decides
                delta, se, decided = lg_delta, lg_se, "layer_group"
            baseline = effects.sweep.baseline
            out.append(LabelTest(
                head[0], head[1], label, *test, baseline, baseline + delta, delta, se,
                math.nan, math.nan, math.nan, group_delta, math.nan, math.nan,
                bool(abs(delta) < bound), bool(abs(delta) + 2 * _finite(se) < bound), decided,
            ))  # fmt: skip
    return out


def _finite(x: float) -> float:
    return 0.0 if math.isnan(x) else x
