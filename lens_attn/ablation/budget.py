"""How ``discover`` fits ``confirm``'s plan to a time budget: the ablation throughput it expects,
and the richest plan (heads with their own tests, prompts per probe set) within that many GFLOP.

    >>> from lens_attn.ablation.confirm import default_probes
    >>> from lens_attn.scoring.probe_sets import score_probe_sets
    >>> probes = default_probes(model)
    >>> scores = score_probe_sets(model, {k: probes[k] for k in ("repeated_random", "natural")},
    ...                           progress=False)
    >>> head_labels = {h: labs for h, labs in scores.classify().labels.items() if labs}
    >>> plan, sets = fit_plan(model, head_labels, probes, scores, 16, 1024,
    ...                       max_gflop=60 * throughput(model, scores, probes))
    >>> plan.gflop <= 60 * throughput(model, scores, probes)
    True

``discover(full=True)`` passes ``max_gflop=math.inf``: every labelled head its own tests.
"""

import functools
from typing import TYPE_CHECKING

from lens_attn.ablation.confirm import label_tests
from lens_attn.ablation.metrics import LAST_POSITION_METRICS
from lens_attn.ablation.plan import plan_confirm, unit_gflop
from lens_attn.probes import Probe

if TYPE_CHECKING:
    from lens_attn.scoring.results import HeadScores

# Ablation passes reach less of the machine than scoring does (vocab-wide log-softmax, the clean
# runs' hooked passes). Measured on 2026-12-03, one thread, the plan's GFLOP over its wall time:
# SmolLM2-135M 62 GFLOP/s in the ablations vs 85 while scoring (0.73); the bundled model 35 vs 25
# (1.4: its scoring matmuls are too small to reach the core). The plan's time estimate uses
# scoring's throughput times this, so it is about right on real models and pessimistic on tiny ones.
ABLATION_EFFICIENCY = 0.7
MIN_CONFIRM_PROMPTS = 8  # fewer and a head's sign-flip test can't go below 2**-7
MIN_OWN_TESTS = 2  # heads per label that keep their own tests however small the budget
N_NULL = 8  # random sets per label: the group test's t has N_NULL - 1 degrees of freedom
ONE_POSITION_FACTOR = 3  # tests on one position a prompt (metrics.LAST_POSITION_METRICS) get
# this many times the prompts (``prompts_for``)


def throughput(model, scores: "HeadScores", probe_sets: dict) -> float:
    """Expected GFLOP/s of the ablations: the last probe kind's scoring throughput (no weight
    scores) times ``ABLATION_EFFICIENCY``."""
    seconds = scores.provenance.get("seconds", {})
    kind = next((k for k in reversed(list(seconds)) if k != next(iter(seconds))), None)
    kind = kind or next(iter(seconds), None)
    if kind is None or seconds[kind] <= 0:
        return 20.0  # a slow CPU core; only used when the scoring time is unknown
    probes = probe_sets[kind]
    flop = sum(unit_gflop(model.cfg, 1, len(p.tokens), len(p.tokens), 0) for p in probes)
    return ABLATION_EFFICIENCY * flop / seconds[kind]


def fit_plan(model, head_labels, probe_sets, scores, prompts, memory_budget_mb, *, max_gflop):
    """The richest plan within ``max_gflop``: fewer heads with their own tests (down to
    ``MIN_OWN_TESTS``), then fewer prompts (down to ``MIN_CONFIRM_PROMPTS``); past that the plan
    runs over the budget (the printed plan says so) rather than decide on too few prompts.
    ``scores.label_score(label)`` ranks each label's heads (best first get their own tests).
    Returns the plan and the probe sets it was made for."""
    tries = [prompts]
    while tries[-1] is not None and tries[-1] > MIN_CONFIRM_PROMPTS:
        tries.append(max(MIN_CONFIRM_PROMPTS, tries[-1] // 2))
    tests_of = functools.partial(label_tests, kinds=frozenset(probe_sets))
    tests = {t for labs in head_labels.values() for lab in labs for t in tests_of(lab)}
    for n in tries:
        sets = {k: evenly(v, prompts_for(k, n, tests)) for k, v in probe_sets.items()}
        plan = plan_confirm(model, head_labels, sets, tests_of=tests_of, rank=scores.label_score,
                            memory_budget_mb=memory_budget_mb, max_gflop=max_gflop,
                            min_heads=MIN_OWN_TESTS, n_null=N_NULL)  # fmt: skip
        if plan.gflop <= max_gflop:
            break
    return plan, sets


def prompts_for(kind: str, n: int | None, tests) -> int | None:
    """Prompts of ``kind`` for ``n`` per test: ``ONE_POSITION_FACTOR * n`` where every test on it
    reads one position per prompt (``logit_diff``; a loss averages over all of them), so that such
    a test gets as many measurements; IOI sentences are short (SmolLM2: 16 tokens, a quarter of a
    repeated random probe), so the extra prompts cost about as much as ``n`` of those."""
    metrics = {metric for k, metric, _ in tests if k == kind}
    one_position = bool(metrics) and metrics <= set(LAST_POSITION_METRICS)
    return n * ONE_POSITION_FACTOR if n is not None and one_position else n


def evenly(probes: list[Probe], n: int | None) -> list[Probe]:
    """At most ``n`` of ``probes``, evenly spaced (both periods of the induction probes stay)."""
    if n is None or len(probes) <= n:
        return list(probes)
    return [probes[int(i * len(probes) / n)] for i in range(n)]
