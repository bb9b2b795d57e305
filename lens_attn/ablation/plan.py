"""What ``confirm`` ablates, how many forward passes that takes, and how much memory one pass needs.

    >>> from lens_attn.ablation.confirm import default_probes, label_tests
    >>> probes = default_probes(model)
    >>> plan = plan_confirm(model, {(1, 5): ("induction",)}, probes, tests_of=label_tests)
    >>> print(plan.describe())                                  # doctest: +ELLIPSIS
    confirm plan (... forward passes, ~... GFLOP, memory budget 1024 MB):
      repeated_random/induction_loss: ... ablations x 32 prompts ...

For each label and each of its tests (``LABEL_TESTS``) the plan lists the units to ablate on that
test's probes:

- ``group``: every head with the label, ablated together;
- ``null``: ``n_null`` random sets of the same size drawn from the same layers (unlabelled heads
  first where they make ``n_null`` different sets, else any head without this label; then heads
  without it from the group's first layer on, then any layer's: a layer with one unlabelled head
  would otherwise put it in every set, and sets without spread make the group test's t
  meaningless). A label with one head has none: its group is the head, and the head's own test
  against the median of random heads decides (a mean-based t is at the mercy of one strong head
  among the random ones: SmolLM2's name mover L23H0, -0.30 logits, against single heads of layer
  23, where the copy suppressor L23H3 alone costs -2.5); Where a label fills its layers (the bundled model's eight induction heads
  are all of layer 1) a set drawn from earlier layers would cut the group's own inputs (its
  random sets with L0H1 cost +7.6 nats, the induction group +8.9), so later layers come first;
- ``single``: each labelled head alone, and ``n_null_single`` (5) random unlabelled heads from the
  same layers alone (the null for one head: their median is the floor a head must beat; five
  give a median, as eight did, for 3 units fewer per label);
- ``context``: the group minus one head, for each head of a group of two or more: the head's
  effect once the heads that back it up are gone, ``delta(group) - delta(group minus head)``.

A benign label (``attention_sink``: it claims the head rests) is tested on the ``mean`` path (each
head replaced by its mean output, whatever the run's method: a resting head carries no information,
but its constant write is a bias later layers may read, which zero ablation would take away). It is
ablated one layer's heads at a time (``layer_group``), and each head alone only in a layer whose
group is not shown benign (a second sweep, ``confirm`` decides; every head is charged to the
budget as if needed). Units shared by several tests are ablated once per probe set.
Nothing else is ablated: not every head, not three sweeps.

A test is ``(probes, metric, path)``; ``test_key`` names it
(``"repeated_random/induction_loss/direct"``).

The budget. Each test's cost is estimated in GFLOP from the model's shape (``unit_gflop``: the
layers from the unit's first ablated layer on, for every prompt token, plus the unembedding of the
positions the metric reads; on the ``direct`` path the unembedding alone). ``max_gflop`` caps
the total: while the plan needs more, the number
of heads per label that get their own single and context tests (``max_heads``, by score) shrinks
(not below ``min_heads``); the heads past it are judged by the group test alone
(``decided_by="group_only"``). The random sets are the price of significance: each of the
``n_null`` null sets and ``n_null_single`` null heads is a unit like any other, charged here
(``discover`` uses 8 sets, so the group test's t has 7 degrees of freedom, and 5 null heads). A ``direct`` test reruns no layer but still unembeds every unit
at the metric's positions, which over a 49k vocabulary is no longer cheap (SmolLM2, ``loss`` on
repeated tokens: 117 direct units for every copying head alone, 2,544 GFLOP, 46 s), so it is
capped like the rest. ``discover`` turns a time budget into GFLOP with the throughput it measured
while scoring.
"""

import functools
import math
import random
from dataclasses import dataclass, field

from lens_attn.ablation.inputs import first_needed, rows_per_pass
from lens_attn.ablation.metrics import PERIOD_METRICS

BENIGN_LABELS = ("attention_sink",)
Head = tuple[int, int]
Unit = tuple[Head, ...]
Test = tuple[str, str, str]  # (probes, metric, path): path "total", "direct" or "mean"


def test_key(test: Test) -> str:
    """``"<probes>/<metric>"``, with ``"/direct"`` or ``"/mean"`` for a test on that path: a
    sweep's name."""
    kind, metric, path = test
    return f"{kind}/{metric}" + ("" if path == "total" else f"/{path}")


@dataclass
class TestPlan:
    """The units one test (probes, metric, path) ablates, and the passes and memory that takes."""

    probes: str
    metric: str
    path: str
    units: list[Unit]
    n_prompts: int
    n_pos: int
    rows: int  # batch rows (ablations x prompts) per forward pass
    passes: int
    mb_per_pass: float
    gflop: float = 0.0


@dataclass
class ConfirmPlan:
    """Per label: ``{test: {role: [units]}}``; per test, the ``TestPlan``."""

    roles: dict[str, dict[Test, dict[str, list[Unit]]]]
    tests: dict[Test, TestPlan] = field(default_factory=dict)
    memory_budget_mb: int | float = 1024
    max_heads: int | None = None  # heads per label with their own tests (None: all)

    @property
    def passes(self) -> int:
        return sum(t.passes for t in self.tests.values())

    @property
    def gflop(self) -> float:
        return float(sum(t.gflop for t in self.tests.values()))

    def describe(self) -> str:
        cap = (
            ""
            if self.max_heads is None
            else f", own tests for the top {self.max_heads} heads per label; the rest are judged "
            "by their group's test alone"
        )
        lines = [f"confirm plan ({self.passes} forward passes, ~{self.gflop:,.0f} GFLOP, "
                 f"memory budget {self.memory_budget_mb:g} MB{cap}):"]  # fmt: skip
        for test, t in self.tests.items():
            lines.append(
                f"  {test_key(test)}: {len(t.units)} ablations x {t.n_prompts} prompts "
                f"(<= {t.n_pos} tokens), {t.rows} rows/pass ~{t.mb_per_pass:.0f} MB, {t.passes} passes, "
                f"~{t.gflop:,.0f} GFLOP"
            )
        for label, tests in self.roles.items():
            parts = [f"{role} {len(u)}" for role, u in next(iter(tests.values())).items() if u]
            lines.append(f"  {label}: {', '.join(parts)} on {', '.join(map(test_key, tests))}")
        return "\n".join(lines)


def _null_sets(group: list[Head], label, head_labels, n_layers, n_heads, rng, n: int,
               rivals=()) -> list[Unit]:  # fmt: skip
    """``n`` random sets matching ``group``'s heads per layer, never holding a ``label`` head
    nor one of a label in ``rivals`` (labels measured on the same probes and metric as
    ``label``)."""
    unlabelled = {h for h in _all(n_layers, n_heads) if not head_labels.get(h)}
    banned = {label, *rivals}
    other = {h for h in _all(n_layers, n_heads) if not banned & set(head_labels.get(h, ()))}
    per_layer: dict[int, int] = {}
    for layer, _ in group:
        per_layer[layer] = per_layer.get(layer, 0) + 1
    # too few unlabelled heads to make n different sets: draw among every head without the label
    distinct = math.prod(math.comb(sum(1 for h in unlabelled if h[0] == layer), count)
                         for layer, count in per_layer.items())  # fmt: skip
    sets = []
    for _ in range(n):
        chosen: list[Head] = []
        for layer, count in sorted(per_layer.items()):
            first = sorted(h for h in unlabelled if h[0] == layer)
            second = sorted(h for h in other if h[0] == layer and h not in first)
            if distinct < n:
                first, second = sorted(first + second), []
            picked = rng.sample(first, min(count, len(first)))
            picked += rng.sample(second, min(count - len(picked), len(second)))
            chosen += picked
        rest = sorted(other - set(chosen))  # downstream of the group first (module docstring)
        downstream = [h for h in rest if h[0] >= min(per_layer)]
        chosen += rng.sample(downstream, min(len(group) - len(chosen), len(downstream)))
        rest = sorted(set(rest) - set(chosen))
        chosen += rng.sample(rest, min(len(group) - len(chosen), len(rest)))
        if chosen:
            sets.append(tuple(sorted(chosen)))
    return sets


def _all(n_layers: int, n_heads: int) -> list[Head]:
    return [(layer, h) for layer in range(n_layers) for h in range(n_heads)]


def label_units(label, heads, head_labels, n_layers, n_heads, *, n_null: int, seed: int,
                max_heads: int | None = None, rivals=(), n_null_single: int = 5):  # fmt: skip
    """``{role: [units]}`` for one label; ``heads`` ranked best first (module docstring)."""
    rng = random.Random(f"{seed}/{label}")
    tested = list(heads)[:max_heads] if max_heads is not None else list(heads)
    group = tuple(sorted(heads))
    roles: dict[str, list[Unit]] = {"group": [group]}
    if label in BENIGN_LABELS:
        layers = sorted({layer for layer, _ in group})
        roles["layer_group"] = [tuple(h for h in group if h[0] == layer) for layer in layers]
        roles["single_if_needed"] = [(h,) for h in group]  # in a layer not shown benign
        return roles
    roles["null"] = _null_sets(list(group), label, head_labels, n_layers, n_heads, rng, n_null,
                               rivals) if len(group) > 1 else []  # fmt: skip
    layers = {layer for layer, _ in group}
    pool = sorted(h for h in _all(n_layers, n_heads) if not head_labels.get(h) and h[0] in layers)
    if len(pool) < n_null_single:
        pool = sorted(h for h in _all(n_layers, n_heads) if not head_labels.get(h))
    roles["single"] = [(h,) for h in sorted(tested)]
    roles["null_single"] = [(h,) for h in rng.sample(pool, min(n_null_single, len(pool)))]
    roles["context"] = (
        [tuple(x for x in group if x != h) for h in sorted(tested)] if len(group) > 1 else []
    )
    return roles


def plan_confirm(
    model,
    head_labels: dict[Head, tuple[str, ...]],
    probe_sets: dict,
    *,
    tests_of,
    n_null: int = 8,
    n_null_single: int = 5,
    memory_budget_mb: int | float = 1024,
    max_gflop: float | None = None,
    min_heads: int = 1,
    rank=None,
    seed: int = 0,
) -> ConfirmPlan:
    """The units every label's tests need and the passes they take (module docstring).

    ``rank(label) -> grid`` orders each label's heads (best first) for ``max_gflop``.
    """
    by_label: dict[str, list[Head]] = {}
    for head, labs in sorted(head_labels.items()):
        for lab in labs:
            by_label.setdefault(lab, []).append(head)
    if rank is not None:
        for lab, heads in by_label.items():
            grid = rank(lab)
            heads.sort(key=lambda h: -float(grid[h]))
    plan_for = functools.partial(_plan, model, by_label, head_labels, probe_sets, tests_of,
                                 n_null=n_null, n_null_single=n_null_single,
                                 memory_budget_mb=memory_budget_mb, seed=seed)  # fmt: skip
    plan = plan_for(max_heads=None)
    cap = max((len(h) for h in by_label.values()), default=0)
    while max_gflop is not None and plan.gflop > max_gflop and cap > min_heads:
        cap = max(min_heads, cap * 2 // 3)
        plan = plan_for(max_heads=cap)
    longest = max((len(h) for h in by_label.values()), default=0)
    plan.max_heads = cap if cap < longest else None
    return plan


def layer_gflop(cfg, n_pos: int) -> float:
    """GFLOP of one block for one token (attention projections, scores over ``n_pos``, MLP)."""
    d_mlp = cfg.d_mlp or 4 * cfg.d_model
    kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    proj = cfg.d_model * cfg.d_head * (2 * cfg.n_heads + 2 * kv)
    return 2 * (proj + 3 * cfg.d_model * d_mlp + 2 * n_pos * cfg.n_heads * cfg.d_head) / 1e9


def unit_gflop(cfg, n_prompts: int, n_pos: int, n_unembed: int, start: int) -> float:
    """GFLOP of one ablation over ``n_prompts`` prompts, starting at layer ``start``."""
    layers = (cfg.n_layers - start) * n_pos * layer_gflop(cfg, n_pos)
    return n_prompts * (layers + n_unembed * 2 * cfg.d_model * cfg.d_vocab / 1e9)


def _first_layer(unit: Unit, path: str, n_layers: int) -> int:
    """The layer a unit's passes start at; a direct-path unit reruns none (``n_layers``)."""
    return n_layers if path == "direct" else min(layer for layer, _ in unit)


def _plan(model, by_label, head_labels, probe_sets, tests_of, *, n_null, n_null_single,
          memory_budget_mb, seed, max_heads) -> ConfirmPlan:  # fmt: skip
    cfg = model.cfg
    roles: dict = {}
    units: dict[Test, dict[Unit, None]] = {}
    extra: dict[Test, dict[Unit, None]] = {}
    for label, heads in by_label.items():
        # labels measured on the same probes and metric (on either path) predict an effect there
        measured = {test[:2] for test in tests_of(label)}
        rivals = [x for x in by_label
                  if x != label and measured & {test[:2] for test in tests_of(x)}]  # fmt: skip
        per_label = label_units(label, heads, head_labels, cfg.n_layers, cfg.n_heads,
                                n_null=n_null, n_null_single=n_null_single, seed=seed,
                                max_heads=max_heads, rivals=rivals)  # fmt: skip
        roles[label] = {}
        for test in tests_of(label):
            roles[label][test] = per_label
            for role, role_units in per_label.items():
                if role != "single_if_needed":  # ablated only if confirm finds it needed
                    units.setdefault(test, {}).update(dict.fromkeys(role_units))
                else:  # charged to the budget as if needed
                    extra.setdefault(test, {}).update(dict.fromkeys(role_units))
    plan = ConfirmPlan(roles, {}, memory_budget_mb)
    for test, unit_set in units.items():
        kind, metric, path = test
        probes = probe_sets[kind]
        n_pos = max(len(p.tokens) for p in probes)
        periods = [p.period for p in probes] if metric in PERIOD_METRICS else None
        lo = first_needed(metric, [len(p.tokens) for p in probes], periods)
        rows, mb = rows_per_pass(model, n_pos, n_pos - lo, memory_budget_mb)
        chunk = max(1, min(rows, len(probes)))
        per_pass = max(1, rows // chunk)  # ablations stacked in one pass
        starts: dict[int, int] = {}  # the sweep groups its passes by the first ablated layer
        for unit in unit_set:
            layer = _first_layer(unit, path, cfg.n_layers)
            starts[layer] = starts.get(layer, 0) + 1
        passes = math.ceil(len(probes) / chunk) * sum(
            math.ceil(n / per_pass) for n in starts.values()
        )
        mean_pos = round(sum(len(p.tokens) for p in probes) / len(probes))
        charged = list(unit_set) + [u for u in extra.get(test, {}) if u not in unit_set]
        gflop = sum(unit_gflop(cfg, len(probes), mean_pos, max(1, mean_pos - lo),
                               _first_layer(u, path, cfg.n_layers)) for u in charged)  # fmt: skip
        plan.tests[test] = TestPlan(
            kind, metric, path, list(unit_set), len(probes), n_pos, rows, passes, mb, gflop
        )
    return plan
