"""One row per (labelled head, label, test): its effects, its p-value, and the correction that
decides it. ``lens_attn.ablation.confirm``'s docstring says what each test asks and why it is
tested the way it is; the p-values are ``lens_attn.ablation.stats``'.

    >>> from lens_attn.ablation.confirm import default_probes, label_tests
    >>> from lens_attn.ablation.plan import plan_confirm
    >>> probes = {"repeated_random": default_probes(model)["repeated_random"][:8]}
    >>> labels = {(1, 5): ("induction",), (1, 6): ("induction",)}
    >>> plan = plan_confirm(model, labels, probes, tests_of=label_tests)
    >>> test = ("repeated_random", "induction_loss", "total")
    >>> units = plan.tests[test].units
    >>> sweep = lens_attn.ablation_sweep(model, probes["repeated_random"], metric="induction_loss",
    ...                                  heads=[list(u) for u in units], progress=False)
    >>> effects = Effects(sweep, {unit: i for i, unit in enumerate(units)})
    >>> rows = label_verdicts(effects, "induction", test, plan.roles["induction"][test])
    >>> rows = decide(rows, alpha=0.05, correction="bh")       # p_adjusted, confirmed
    >>> [(r.layer, r.head, r.decided_by, r.confirmed) for r in rows]     # doctest: +ELLIPSIS
    [(1, 5, ...), (1, 6, ...)]

(``confirm`` does this for every label and test of a plan.)
"""

import dataclasses
import math
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from lens_attn.ablation import stats
from lens_attn.ablation.metrics import harm_sign
from lens_attn.ablation.plan import Test
from lens_attn.ablation.result import AblationResult


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
    group_p: float  # the group against the random sets (t prediction); NaN for benign labels
    head_p: float  # the head's own test (single or context, Bonferroni x2); TOST for benign
    p: float  # the deciding test's p-value: max(group_p, head_p), or group_p for group_only
    p_adjusted: float  # p corrected across every row of the run (``correction``)
    confirmed: bool  # p_adjusted < alpha (the deciding test is significant)
    significant: bool  # the same: kept for readers of older runs
    # group | single | context | group_only | group_benign | single_benign | layer_group
    decided_by: str

    @property
    def test(self) -> Test:
        """``(probes, metric, path)``: the test, as ``LABEL_TESTS`` lists it."""
        return (self.probes, self.metric, self.path)


class Effects:
    """Per-unit deltas of one sweep, looked up by unit; paired differences with their stderr."""

    def __init__(self, sweep: AblationResult, index: dict):
        self.sweep, self.index = sweep, index
        self.diff = sweep.ablated_per_prompt - sweep.baseline_per_prompt[None]  # [unit, prompt]

    def delta(self, unit) -> tuple[float, float]:
        return mean_se(self.diff[self.index[unit]])

    def minus(self, a, b) -> tuple[float, float]:
        return mean_se(self.per_prompt(a, b))

    def per_prompt(self, a, b=None) -> Float[Tensor, " prompt"]:
        """Per-prompt delta of unit ``a``, minus that of unit ``b`` if given."""
        x = self.diff[self.index[a]]
        return x if b is None else x - self.diff[self.index[b]]


def mean_se(x: torch.Tensor) -> tuple[float, float]:
    n = x.shape[0]
    se = float(x.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan
    return float(x.mean()), se


def label_verdicts(effects: Effects, label, test: Test, roles, **_) -> list[LabelTest]:
    """Each head's row with its p-value (module docstring); ``confirm`` corrects and decides."""
    sign = harm_sign(test[1])  # the comparisons below are on sign * delta: positive hurts
    group = roles["group"][0]
    group_delta, _ = effects.delta(group)
    nulls = [effects.delta(u)[0] for u in roles["null"]]
    null_max = sign * max(sign * d for d in nulls) if nulls else math.nan  # the most harmful
    # a group of one head has no null sets: the head's own test decides (plan.label_units)
    group_p = (
        _p(stats.prediction_t_p(sign * group_delta, [sign * d for d in nulls]))
        if len(group) > 1
        else math.nan
    )
    singles = [effects.delta(u)[0] for u in roles["null_single"]]
    null_single = float(torch.tensor(singles).median()) if singles else math.nan
    floor = sign * null_single if not math.isnan(null_single) else 0.0
    tested = [u[0] for u in roles["single"]]
    rest = dict(zip(tested, roles["context"], strict=False)) if roles["context"] else {}
    baseline = effects.sweep.baseline
    out = []
    for head in group:
        if (head,) not in effects.index or head not in tested:  # past the plan's max_heads
            out.append(LabelTest(
                head[0], head[1], label, *test, baseline, math.nan, math.nan, math.nan,
                null_single, math.nan, math.nan, group_delta, null_max, group_p, math.nan,
                group_p, group_p, False, False, "group_only",
            ))  # fmt: skip
            continue
        delta, se = effects.delta((head,))
        per_head = {"single": stats.sign_flip_p(sign * effects.per_prompt((head,)) - floor)}
        if head in rest:
            context, context_se = effects.minus(group, rest[head])
            per_head["context"] = stats.sign_flip_p(sign * effects.per_prompt(group, rest[head]))
        else:
            context, context_se = math.nan, math.nan
        best = min(per_head, key=per_head.get)
        head_p = min(1.0, len(per_head) * per_head[best])  # Bonferroni over the head's tests
        if math.isnan(group_p) or group_p < head_p:
            p, decided = head_p, best
        else:
            p, decided = group_p, "group"
        out.append(LabelTest(
            head[0], head[1], label, *test, baseline, baseline + delta, delta, se,
            null_single, context, context_se, group_delta, null_max, group_p, head_p,
            p, p, False, False, decided,
        ))  # fmt: skip
    return out


def layer_shown_benign(effects: Effects, layer_group, *, bound: float, alpha: float) -> bool:
    """Whether a benign label's heads of one layer, ablated together, are shown to leave the
    metric within ``bound`` (their TOST p-value below ``alpha``); if not, each is tested alone."""
    return _benign_p(effects, layer_group, bound) < alpha


def _benign_p(effects: Effects, unit, bound: float) -> float:
    """TOST p-value that ablating ``unit`` changes the metric by less than ``bound``."""
    return _p(stats.tost_p(effects.per_prompt(unit), bound))


def benign_verdicts(effects: Effects, label, test: Test, roles, *, bound: float,
                    alpha: float) -> list[LabelTest]:  # fmt: skip
    """A benign label's rows: equivalence (TOST) p-values against ``bound`` (module docstring)."""
    group = roles["group"][0]
    group_delta, _ = effects.delta(group)
    baseline = effects.sweep.baseline
    out = []
    for layer_group in roles["layer_group"]:
        group_p = _benign_p(effects, layer_group, bound)  # layer_shown_benign: below alpha
        for head in layer_group:
            if group_p < alpha:
                unit, decided, p = layer_group, "group_benign", group_p
            elif (head,) in effects.index:
                unit, decided = (head,), "single_benign"
                p = _benign_p(effects, unit, bound)
            else:  # not ablated alone (a plan made without it): the layer's group decides
                unit, decided, p = layer_group, "layer_group", group_p
            delta, se = effects.delta(unit)
            out.append(LabelTest(
                head[0], head[1], label, *test, baseline, baseline + delta, delta, se,
                math.nan, math.nan, math.nan, group_delta, math.nan, math.nan, p,
                p, p, False, False, decided,
            ))  # fmt: skip
    return out


def _p(p: float) -> float:
    """A p-value for the family: NaN (no null sets, no prompts) counts as no evidence, 1."""
    return 1.0 if math.isnan(p) else p


def decide(
    tests: list[LabelTest], *, alpha: float, correction: stats.Correction
) -> list[LabelTest]:
    """``p_adjusted`` across every row of the run, ``significant`` below ``alpha``, and
    ``confirmed`` (significant, and decided by a test of the head or its group)."""
    adjusted = stats.adjust([t.p for t in tests], correction)
    return [
        dataclasses.replace(t, p_adjusted=q, significant=q < alpha, confirmed=q < alpha)
        for t, q in zip(tests, adjusted, strict=True)
    ]
