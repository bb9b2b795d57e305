"""The head-discovery workflow behind ``lens-attn discover``: score, classify, confirm, write a run folder.

    >>> from lens_attn.discover import discover
    >>> run = discover(lens_attn.load_model(), tmp_path / "demo", progress=False)
    >>> print(run.summary())                                       # doctest: +ELLIPSIS
    kind             head    score  ablation effect ...
    induction        L1H...
    >>> (tmp_path / "demo" / "run.json").is_file()
    True

The run folder:

================  ===================================================================================
``scores.csv``    one row per head: ``layer, head, unit, <every score>, <score>_stderr``
``scores.json``   the same grids with provenance (``HeadScores.load`` reads it)
``labels.csv``    ``layer, head, unit, labels`` (``;``-separated) from ``HeadScores.classify()``
``ablation.csv``  the confirming ablations: ``layer, head, label, metric, baseline, ablated, delta, ...``
``report.html``   the offline report: every layer's patterns on a prompt, with the score grid
``figures/``      score heatmaps, ablation-effect heatmaps, the top heads' attention maps (PNG)
``run.json``      model source and config, probe seed, versions, timings, ``files``; written last
================  ===================================================================================

The folder is a :class:`lens_attn.runs.RunFolder`: checked and locked before the compute starts, a
previous run in it refused unless ``overwrite=True``, and ``run.json`` written last as the marker
that the run completed.

Under ``torchrun`` every rank scores and ablates its shard; only rank 0 writes.
"""

import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from lens_attn import distributed
from lens_attn.ablation.confirm import ConfirmResult, confirm
from lens_attn.heads import head_label
from lens_attn.probes import Probe, prompt_probes
from lens_attn.runs import RunFolder, run_info
from lens_attn.scoring.results import LABEL_SCORE, HeadLabels, HeadScores
from lens_attn.scoring.runner import score_heads

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

    def summary(self, k: int = 3) -> str:
        """The top heads of each kind with their score and confirming ablation effect."""
        effects = {}
        for t in self.confirmation.tests:
            effects.setdefault((t.layer, t.head, t.label), t)  # the first test of each label
        lines = [f"{'kind':<16} {'head':<6} {'score':>6}  {'ablation effect':<34} confirmed"]
        for label in SUMMARY_LABELS:
            heads = self.labels.heads_with(label)
            score = LABEL_SCORE[label]
            ranked = sorted(heads, key=lambda h: -float(self.scores[score][h]))[:k]
            if not ranked:
                lines.append(f"{label:<16} (none above {self.labels.thresholds[label]:g})")
            for layer, head in ranked:
                t = effects.get((layer, head, label))
                effect = (
                    f"{t.delta:+.3f} {t.metric} (median {t.median_unlabelled_delta:+.3f})"
                    if t
                    else "not tested"
                )
                verdict = ("yes" if t.confirmed else "no") if t else "-"
                lines.append(
                    f"{label:<16} {head_label(layer, head):<6} "
                    f"{float(self.scores[score][layer, head]):>6.2f}  {effect:<34} {verdict}"
                )
        return "\n".join(lines)


def ablation_table(confirmation: ConfirmResult):
    """``ablation.csv``: one row per (labelled head, label, test)."""
    df = confirmation.to_dataframe()
    first = ["layer", "head", "label", "metric", "baseline", "ablated", "delta"]
    return df[first + [c for c in df.columns if c not in first]]


def discover(
    model,
    out: "str | os.PathLike | RunFolder",
    *,
    source: str | None = None,
    batch_size: int = 16,
    method: str = "zero",
    query_chunk: int | None = None,
    figures: bool = True,
    progress: bool = True,
    overwrite: bool = False,
) -> DiscoverRun:
    """Score every head on the built-in probes, classify, confirm with ablations, write ``out``.

    ``query_chunk`` scores without building full patterns (``score_heads``); ``method`` is the
    confirming ablation (``lens_attn.ablation.methods.AblationMethod``). ``out`` is a folder, checked and
    locked before anything is computed (a previous run in it is refused unless ``overwrite``), or a
    :class:`~lens_attn.runs.RunFolder` the caller has already entered.
    """
    group = distributed.current_group(device=model.cfg.device)
    main = distributed.is_main(group)
    with ExitStack() as stack:
        folder = None
        if main:
            folder = out if isinstance(out, RunFolder) else RunFolder(out, overwrite=overwrite)
            if not isinstance(out, RunFolder):
                stack.enter_context(folder)
        return _discover(model, folder, out, source=source, batch_size=batch_size,
                         method=method, query_chunk=query_chunk, figures=figures,
                         progress=progress and main)  # fmt: skip


def _discover(model, folder, out, *, source, batch_size, method, query_chunk, figures,
              progress) -> DiscoverRun:  # fmt: skip
    timings: dict[str, float] = {}

    start = time.perf_counter()
    scores = score_heads(model, batch_size=batch_size, query_chunk=query_chunk, progress=progress)
    timings["scores_s"] = time.perf_counter() - start
    labels = scores.classify()

    start = time.perf_counter()
    confirmation = confirm(model, scores, labels=labels, method=method, progress=progress)
    timings["ablation_s"] = time.perf_counter() - start

    where = folder.out if folder is not None else Path(getattr(out, "out", out))
    run = DiscoverRun(scores, labels, confirmation, where, timings)
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
    table = ablation_table(run.confirmation).to_csv(index=False)
    run.files.append(folder.write_text("ablation.csv", table))

    probe = prompt_probes(model, [REPORT_PROMPT])[0]
    patterns = capture_patterns(model, [Probe("prompt", probe.tokens[: model.cfg.n_ctx])])
    top = run.scores.top("induction", 1)[0][:2]
    run.files.append(
        render_report(
            patterns,
            run.scores,
            path=folder.path("report.html"),
            title=f"lens-attn discover: {source or model.cfg.model_name}",
            open_head=top,
        )
    )
    if figures:
        run.files += _figures(run, patterns, folder)


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
        score = LABEL_SCORE[label]
        if heads:
            layer, head = max(heads, key=lambda h: float(run.scores[score][h]))
            fig = plot_head(patterns, layer, head)
            path = folder.path(f"figures/top_{label}_L{layer}H{head}.png")
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
    )  # fmt: skip
    run.files.append(folder.complete(info))  # run.json, with the files written: last
