"""The head-discovery workflow behind ``lens-attn discover``: score, classify, confirm, write a run folder.

    >>> from lens_attn.discover import discover
    >>> run = discover(lens_attn.load_model(), tmp_path / "demo", progress=False)
    >>> print(run.summary())                                       # doctest: +ELLIPSIS
    kind            head   score  test ...
    induction       8 heads (score on repeated_random), 8 confirmed by all tests
    ...
    >>> (tmp_path / "demo" / "run.json").is_file()
    True

The run folder:

================  ===================================================================================
``scores.csv``    one row per head: ``layer, head, unit, <every score>, <score>_stderr``
``scores.json``   the same grids with provenance (``HeadScores.load`` reads it)
``labels.csv``    ``layer, head, unit, labels`` (``;``-separated) from ``HeadScores.classify()``
``ablation.csv``  the confirming ablations: ``layer, head, label, metric, baseline, ablated, delta, ...,
                  p, p_adjusted, confirmed, significant, decided_by`` (``lens_attn.ablation.confirm``)
``report.html``   the offline report: every layer's patterns on a prompt, with the score grid
``atlas/``        with ``corpus=``: the head atlas of that corpus (``lens_attn.atlas``), each head's
                  page showing its labels and their confirmations
``figures/``      score heatmaps, ablation-effect heatmaps, the top heads' attention maps (PNG)
``run.json``      model source and config, probe seed, versions, timings, ``coverage`` (confirmed
                  heads, ``ConfirmResult.coverage``), ``files``; written last
================  ===================================================================================

The folder is a :class:`lens_attn.runs.RunFolder`: checked and locked before the compute starts, a
previous run in it refused unless ``overwrite=True``, and ``run.json`` written last as the marker
that the run completed.

Under ``torchrun`` every rank scores and ablates its shard; only rank 0 writes.
"""

import math
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lens_attn import distributed
from lens_attn.ablation import budget
from lens_attn.ablation.confirm import ConfirmResult, confirm, default_probes
from lens_attn.ablation.metrics import harm_sign
from lens_attn.ablation.plan import BENIGN_LABELS, ConfirmPlan, test_key
from lens_attn.heads import head_label
from lens_attn.probes import Probe, prompt_probes
from lens_attn.runs import RunFolder, run_info
from lens_attn.scoring.probe_sets import score_probe_sets
from lens_attn.scoring.results import LABEL_PROBES, LABEL_SCORE, HeadLabels, HeadScores

if TYPE_CHECKING:
    from lens_attn.circuits import CircuitResult

REPORT_PROMPT = (
    "When Mary and John went to the store, John gave a drink to Mary. "
    "Later that evening, Mary thanked John for the drink."
)
SUMMARY_LABELS = (
    "induction",
    "previous_token",
    "duplicate_token",
    "current_token",
    "attention_sink",
)
HEATMAP_SCORES = (
    "previous_token",
    "induction",
    "duplicate_token",
    "current_token",
    "bos",
    "entropy",
    "copying",
    "copy_rank",
    "suppress_rank",
)


@dataclass
class DiscoverRun:
    """What one discovery run found, and where it wrote it."""

    scores: HeadScores
    labels: HeadLabels
    confirmation: ConfirmResult
    out: Path
    timings: dict[str, float] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    plan: "ConfirmPlan | None" = None
    atlas: object = None  # a HeadAtlas when discover was given a corpus
    circuit: "CircuitResult | None" = None  # discover(circuit=True): what feeds the induction heads

    def summary(self, k: int = 5) -> str:
        """Per label: its group test, then its top ``k`` heads ("+N more") with every test."""
        return summary_table(self.scores, self.labels, self.confirmation, k=k)


def summary_table(
    scores: HeadScores, labels: HeadLabels, confirmation: ConfirmResult, *, k=5
) -> str:
    """The text table ``lens-attn discover`` prints (see ``DiscoverRun.summary``).

    One line per (head, test): ``delta ± stderr`` of the head alone, its in-context effect (the
    group minus it), the verdict with the deciding test's corrected p-value (``p_adj``), and that
    test; the last lines name the correction and the coverage (``ConfirmResult.coverage``).
    """
    by_head: dict[tuple, list] = {}
    for t in confirmation.tests:
        by_head.setdefault((t.layer, t.head, t.label), []).append(t)
    lines = [
        f"{'kind':<15} {'head':<7}{'score':>5}  {'test':<30} {'alone':>15} {'in context':>15}  verdict"
    ]
    for label in [*SUMMARY_LABELS, *(x for x in labels.thresholds if x not in SUMMARY_LABELS)]:
        heads = labels.heads_with(label)
        where = LABEL_PROBES.get(label) or "weights"
        if LABEL_SCORE[label] not in scores.values:  # e.g. name_mover under query_chunk
            lines.append(f"{label:<15} (not scored in this run)")
            continue
        grid = scores.label_score(label)
        if not heads and bool(torch.isnan(grid).all()):  # e.g. no one-token names: no ioi
            lines.append(f"{label:<15} (not measured: no {where} probes for this model)")
            continue
        if not heads:
            lines.append(f"{label:<15} (none at >= {labels.thresholds[label]:g} on {where})")
            continue
        ranked = sorted(heads, key=lambda h: -float(grid[h]))
        ok = [h for h in heads if (*h, label) in by_head
              and all(t.confirmed for t in by_head[(*h, label)])]  # fmt: skip
        by_group = sum(any(t.decided_by == "group_only" for t in by_head[(*h, label)]) for h in ok)
        alone = f" ({by_group} by the group test alone)" if by_group else ""
        lines.append(f"{label:<15} {len(heads)} heads (score on {where}), {len(ok)} confirmed "
                     f"by all tests{alone}")  # fmt: skip
        tested: dict = {}  # each test of the label, with its first head's verdict
        for h in heads:
            for t in by_head.get((*h, label), []):
                tested.setdefault(t.test, t)
        for test, first in tested.items():
            if not math.isnan(first.group_null_max):
                bound = "<=" if harm_sign(test[1]) > 0 else ">="  # the most harmful random set
                lines.append(f"{'':<15} group on {test_key(test)}: {first.group_delta:+.3f} vs "
                             f"random sets {bound} {first.group_null_max:+.3f} (p={first.group_p:.2g})")  # fmt: skip
            elif first.label in BENIGN_LABELS:
                lines.append(f"{'':<15} group on {test_key(test)}: {first.group_delta:+.3f} "
                             f"(benign if |delta| < {confirmation.provenance.get('benign_bound', 0.05):g})")  # fmt: skip
            else:  # one head: no group beyond it (ablation.plan)
                lines.append(f"{'':<15} one head on {test_key(test)}: its own test decides")
        for layer, head in ranked[:k]:
            for i, t in enumerate(by_head.get((layer, head, label), [])):
                name = (
                    f"{head_label(layer, head):<7}{float(grid[layer, head]):>5.2f}"
                    if i == 0
                    else " " * 12
                )
                ctx = (
                    ""
                    if math.isnan(t.context_delta)
                    else f"{t.context_delta:+.3f}±{t.context_stderr:.3f}"
                )
                verdict = f"{'yes' if t.confirmed else 'no':<3} p_adj={t.p_adjusted:<7.2g}"
                lines.append(f"{'':<15} {name}  {test_key(t.test):<30} "
                             f"{f'{t.delta:+.3f}±{t.stderr:.3f}':>15} {ctx:>15}  {verdict} ({t.decided_by})")  # fmt: skip
        if len(ranked) > k:
            lines.append(f"{'':<15} +{len(ranked) - k} more (labels.csv, ablation.csv)")
    info = confirmation.provenance
    method = {"bh": "Benjamini-Hochberg", "holm": "Holm"}.get(info.get("correction"), "?")
    lines.append(f"yes: the deciding test's p-value, corrected across the run's {len(confirmation.tests)} "
                 f"tests ({method}), is below {info.get('alpha', 0.05):g} (lens_attn.ablation.confirm)")  # fmt: skip
    cov = confirmation.coverage()
    lines.append(f"coverage: {cov['confirmed']} of {cov['heads']} heads ({cov['share']:.0%}) have a "
                 f"confirmed label other than attention_sink ({cov['labelled']} have such a label)")  # fmt: skip
    return "\n".join(lines)


def discover(
    model,
    out: "str | os.PathLike | RunFolder",
    *,
    source: str | None = None,
    batch_size: int = 16,
    method: str = "zero",
    query_chunk: int | None = None,
    memory_budget_mb: int | float = 1024,
    confirm_prompts: int | None = 16,
    ablation_budget_s: int | float = 60,
    figures: bool = True,
    progress: bool = True,
    log=None,
    overwrite: bool = False,
    corpus=None,
    circuit: bool = False,
    full: bool = False,
) -> DiscoverRun:
    """Score every head on the built-in probes, classify, confirm with ablations, write ``out``.

    Each probe kind is scored on its own (``score_probe_sets``) so each label reads the probes
    that define it. ``query_chunk`` scores without building full patterns; ``method`` is the
    confirming ablation (``lens_attn.ablation.methods.AblationMethod``); ``confirm_prompts`` caps
    the prompts of each set the ablations run on (``None``: all); ``memory_budget_mb`` caps one
    ablation pass; ``ablation_budget_s`` is the time the confirming ablations may take, turned into
    GFLOP with the throughput measured while scoring: ``plan_confirm`` gives fewer heads their own
    tests (down to ``MIN_OWN_TESTS`` per label), then fewer prompts (down to
    ``MIN_CONFIRM_PROMPTS``), until the plan fits; the printed plan says what it dropped.
    ``full=True`` ignores the budget: every labelled head gets its own tests on
    ``confirm_prompts`` prompts of each set (SmolLM2: about 2.5x the default run's ablations). The plan (``plan_confirm``: what is ablated, passes, memory per pass) and the
    per-stage times go to ``log`` (e.g. ``print``; ``None``: silent). ``out`` is a folder, checked
    and locked before anything is computed (a previous run in it is refused unless ``overwrite``),
    or a :class:`~lens_attn.runs.RunFolder` the caller has already entered. ``corpus``: texts (a
    list or a ``read_corpus`` iterable) to build the head atlas of into ``out/atlas/``. ``circuit=True`` also
    runs ``lens_attn.circuit`` on the confirmed induction heads (``edges.csv``, ``circuit.json``, a
    graph in the report); off by default: on SmolLM2 it adds about a minute of CPU time.
    """
    group = distributed.current_group(device=model.cfg.device)
    main = distributed.is_main(group)
    with ExitStack() as stack:
        folder = None
        if main:
            folder = out if isinstance(out, RunFolder) else RunFolder(out, overwrite=overwrite)
            if not isinstance(out, RunFolder):
                stack.enter_context(folder)
        return _discover(model, folder, out, source=source, batch_size=batch_size, method=method,
                         query_chunk=query_chunk, memory_budget_mb=memory_budget_mb,
                         confirm_prompts=confirm_prompts, ablation_budget_s=ablation_budget_s,
                         figures=figures, progress=progress and main, corpus=corpus,
                         circuit=circuit, full=full,
                         say=log if (log is not None and main) else (lambda *_: None))  # fmt: skip


def _discover(model, folder, out, *, source, batch_size, method, query_chunk, memory_budget_mb,
              confirm_prompts, ablation_budget_s, figures, progress, say, corpus=None,
              circuit=False, full=False) -> DiscoverRun:  # fmt: skip
    timings: dict[str, float] = {}

    start = time.perf_counter()
    probe_sets = default_probes(model)  # the scored kinds, and confirm's ioi sentences
    scored = {k: v for k, v in probe_sets.items() if k in LABEL_PROBES.values()}
    scores = score_probe_sets(model, scored, batch_size=batch_size, query_chunk=query_chunk,
                              progress=progress)  # fmt: skip
    timings["scores_s"] = time.perf_counter() - start
    say(f"scores: {sum(map(len, scored.values()))} probes in {timings['scores_s']:.1f}s")
    labels = scores.classify()

    start = time.perf_counter()
    head_labels = {h: labs for h, labs in labels.labels.items() if labs}
    gflops = budget.throughput(model, scores, probe_sets)
    gflop = math.inf if full else ablation_budget_s * gflops
    plan, confirm_sets = budget.fit_plan(model, head_labels, probe_sets, scores, confirm_prompts,
                                         memory_budget_mb, max_gflop=gflop)  # fmt: skip
    say(plan.describe())
    say(
        f"  at {gflops:.0f} GFLOP/s (from the scoring throughput): ~{plan.gflop / gflops:.0f}s "
        + ("(--full: no budget)" if full else f"for a budget of {ablation_budget_s:g}s")
    )
    confirmation = confirm(model, labels=labels, method=method, probes=confirm_sets, plan=plan, n_null=budget.N_NULL,
                           memory_budget_mb=memory_budget_mb, progress=progress)  # fmt: skip
    timings["ablation_s"] = time.perf_counter() - start
    say(f"ablations: {plan.passes} passes in {timings['ablation_s']:.1f}s")

    where = folder.out if folder is not None else Path(getattr(out, "out", out))
    run = DiscoverRun(scores, labels, confirmation, where, timings, plan=plan)
    if corpus is not None:
        from lens_attn.atlases import atlas

        start = time.perf_counter()
        run.atlas = atlas(model, corpus, batch_size=max(1, batch_size // 2), progress=progress,
                          log=say)  # fmt: skip
        timings["atlas_s"] = time.perf_counter() - start
    if circuit:
        from lens_attn.circuits.find import confirmed_circuit

        start = time.perf_counter()
        run.circuit = confirmed_circuit(model, labels, confirmation, log=say)
        timings["circuit_s"] = time.perf_counter() - start
    if folder is not None:
        start = time.perf_counter()
        _write(run, folder, model, source=source, figures=figures)
        timings["write_s"] = time.perf_counter() - start
        _write_run_json(run, folder, model, source, batch_size, method)
    return run


def _write(run: DiscoverRun, folder: RunFolder, model, *, source, figures: bool) -> None:
    from lens_attn.patterns import capture_patterns
    from lens_attn.render.report import render_report

    out = run.out
    run.scores.save(out)
    run.files += [folder.path("scores.csv"), folder.path("scores.json")]
    run.files.append(folder.write_text("labels.csv", run.labels.to_dataframe().to_csv(index=False)))
    df = run.confirmation.to_dataframe()  # ablation.csv: one row per (labelled head, label, test)
    first = ["layer", "head", "label", "metric", "baseline", "ablated", "delta"]
    table = df[first + [c for c in df.columns if c not in first]].to_csv(index=False)
    run.files.append(folder.write_text("ablation.csv", table))

    probe = prompt_probes(model, [REPORT_PROMPT])[0]
    patterns = capture_patterns(model, [Probe("prompt", probe.tokens[: model.cfg.n_ctx])])
    open_score = _open_score(run.scores)
    grid = _grid(run.scores, open_score)
    flat = int(torch.nan_to_num(grid, nan=-math.inf).flatten().argmax())
    top = (flat // run.scores.n_heads, flat % run.scores.n_heads)  # the grid's top cell
    report = render_report(patterns, run.scores, path=folder.path("report.html"), open_head=top,
                           title=f"lens-attn discover: {source or model.cfg.model_name}",
                           open_score=open_score, heads=head_notes(run), circuit=run.circuit)  # fmt: skip
    run.files.append(report)
    if run.circuit is not None:
        run.files += [folder.write_text(name, text) for name, text in run.circuit.files().items()]
    if figures:
        run.files += _figures(run, patterns, folder)
    if run.atlas is not None:
        from lens_attn.render.atlas import render_atlas
        from lens_attn.render.circuit_graph import circuit_svg

        labels = {head_label(*h): list(labs) for h, labs in run.labels.labels.items() if labs}
        graph = circuit_svg(run.circuit) if run.circuit is not None else None  # discover --circuit
        page = render_atlas(run.atlas, folder.out / "atlas", folder=folder, scores=run.scores,
                            labels=labels, notes=head_notes(run), circuit_svg=graph,
                            title=f"lens-attn atlas: {source or model.cfg.model_name}")  # fmt: skip
        run.files += [page] + [folder.write_text(f"atlas/{name}", text)
                               for name, text in run.atlas.files().items()]  # fmt: skip


def _open_score(scores: HeadScores) -> str:
    """The grid the report opens on: induction on its own probes where it was scored that way."""
    if "induction" in scores.per_probe_set.get("repeated_random", HeadScores({}, {})).values:
        return "induction@repeated_random"
    return "induction" if "induction" in scores.values else scores.names[0]


def _grid(scores: HeadScores, name: str):
    score, _, kind = name.partition("@")
    return scores.per_probe_set[kind].values[score] if kind else scores.values[score]


def head_notes(run: DiscoverRun) -> dict[str, list[str]]:
    """``{"L1H5": [lines]}`` for the report: each label with its score and every test's verdict."""
    notes: dict[str, list[str]] = {}
    for (layer, head), labs in sorted(run.labels.labels.items()):
        for lab in labs:
            where = LABEL_PROBES.get(lab) or "weights"
            score = float(run.scores.label_score(lab)[layer, head])
            notes.setdefault(head_label(layer, head), []).append(
                f"{lab}: score {score:.2f} on {where}"
            )
    for t in run.confirmation.tests:
        verdict = (
            "confirmed" if t.confirmed else "not confirmed"
        ) + f", p_adjusted {t.p_adjusted:.2g}"
        ctx = "" if math.isnan(t.context_delta) else f", in context {t.context_delta:+.3f}"
        notes.setdefault(head_label(t.layer, t.head), []).append(
            f"  {t.label} on {test_key(t.test)}: alone {t.delta:+.3f} ± {t.stderr:.3f}{ctx}, "
            f"group {t.group_delta:+.3f}: {verdict} (by {t.decided_by})"
        )
    return notes


def _figures(run: DiscoverRun, patterns, folder: RunFolder) -> list[Path]:
    from lens_attn.render.figures import plot_head, save_figure
    from lens_attn.render.grids import plot_ablation, plot_scores

    written = []
    for name in HEATMAP_SCORES:
        if name in run.scores.values:
            path = folder.path(f"figures/scores_{name}.png")
            written.append(save_figure(plot_scores(run.scores, name), path))
    for key, sweep in run.confirmation.sweeps.items():
        path = folder.path(f"figures/ablation_{key.replace('/', '__')}.png")
        written.append(save_figure(plot_ablation(sweep), path))
    tops = {label: run.labels.heads_with(label) for label in SUMMARY_LABELS}
    for label, heads in tops.items():
        grid = run.scores.label_score(label)
        if heads:
            layer, head = max(heads, key=lambda h: float(grid[h]))
            fig = plot_head(patterns, layer, head)
            path = folder.path(f"figures/top_{label}_{head_label(layer, head)}.png")
            written.append(save_figure(fig, path))
    return written


def _write_run_json(
    run: DiscoverRun, folder: RunFolder, model, source, batch_size: int, method: str
) -> None:
    info = run_info(
        model, source, run.timings,
        probe_seed=run.scores.provenance.get("probe_seed"),
        probe_hash=run.scores.provenance.get("probe_hash"),
        batch_size=batch_size, ablation_method=method, thresholds=run.labels.thresholds,
        world_size=run.scores.provenance.get("world_size", 1),
        confirm={**{k: run.confirmation.provenance.get(k)
                    for k in ("alpha", "correction", "n_null", "n_null_single", "prompts")},
                 # heads per label with their own tests (None: every labelled head)
                 "own_tests_per_label": run.plan.max_heads if run.plan is not None else None},
        coverage=run.confirmation.coverage(),
    )  # fmt: skip
    run.files.append(folder.complete(info))  # run.json, with the files written: last
