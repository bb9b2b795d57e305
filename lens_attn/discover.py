"""The head-discovery workflow behind ``lens-attn discover``: score, classify, confirm, write a run folder.

    >>> model = lens_attn.load_model()
    >>> run = lens_attn.discover.discover(model, "runs/demo", source="bundled")
    >>> print(run.summary())

The run folder:

================  ===================================================================================
``scores.csv``    one row per head: ``layer, head, label, <every score>, <score>_stderr``
``scores.json``   the same grids with provenance (``HeadScores.load`` reads it)
``labels.csv``    ``layer, head, unit, labels`` (``;``-separated) from ``HeadScores.classify()``
``ablation.csv``  the confirming ablations: ``layer, head, label, metric, baseline, ablated, delta, ...``
``report.html``   the offline report: every layer's patterns on a prompt, with the score grid
``figures/``      score heatmaps, ablation-effect heatmaps, the top heads' attention maps (PNG)
``run.json``      model source and config, probe seed, versions, timings
================  ===================================================================================

Under ``torchrun`` every rank scores and ablates its shard; only rank 0 writes.
"""

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lens_attn import distributed
from lens_attn.confirmation import ConfirmResult, confirm
from lens_attn.probes import Probe, bos_info, prompt_probes
from lens_attn.results import LABEL_SCORE, HeadLabels, HeadScores, _write_atomic, head_label
from lens_attn.scores import score_heads

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
    out: "str | os.PathLike",
    *,
    source: str | None = None,
    batch_size: int = 16,
    method: str = "zero",
    query_chunk: int | None = None,
    figures: bool = True,
    progress: bool = True,
) -> DiscoverRun:
    """Score every head on the built-in probes, classify, confirm with ablations, write ``out``.

    ``query_chunk`` scores without building full patterns (``score_heads``); ``method`` is the
    confirming ablation (``lens_attn.ablation.AblationMethod``).
    """
    group = distributed.current_group(device=model.cfg.device)
    main = distributed.is_main(group)
    progress = progress and main
    timings: dict[str, float] = {}

    start = time.perf_counter()
    scores = score_heads(model, batch_size=batch_size, query_chunk=query_chunk, progress=progress)
    timings["scores_s"] = time.perf_counter() - start
    labels = scores.classify()

    start = time.perf_counter()
    confirmation = confirm(model, scores, labels=labels, method=method, progress=progress)
    timings["ablation_s"] = time.perf_counter() - start

    run = DiscoverRun(scores, labels, confirmation, Path(out), timings)
    if main:
        start = time.perf_counter()
        _write(run, model, source=source, figures=figures)
        timings["write_s"] = time.perf_counter() - start
        _write_run_json(run, model, source, batch_size, method)
    return run


def _write(run: DiscoverRun, model, *, source, figures: bool) -> None:
    from lens_attn.patterns import capture_patterns
    from lens_attn.report import render_report

    out = run.out
    out.mkdir(parents=True, exist_ok=True)
    run.scores.save(out)
    _write_atomic(out / "labels.csv", run.labels.to_dataframe().to_csv(index=False))
    _write_atomic(out / "ablation.csv", ablation_table(run.confirmation).to_csv(index=False))
    run.files += [out / "scores.csv", out / "scores.json", out / "labels.csv", out / "ablation.csv"]

    probe = prompt_probes(model, [REPORT_PROMPT])[0]
    patterns = capture_patterns(model, [Probe("prompt", probe.tokens[: model.cfg.n_ctx])])
    top = run.scores.top("induction", 1)[0][:2]
    run.files.append(
        render_report(
            patterns,
            run.scores,
            path=out / "report.html",
            title=f"lens-attn discover: {source or model.cfg.model_name}",
            open_head=top,
        )
    )
    if figures:
        run.files += _figures(run, patterns, out / "figures")


def _figures(run: DiscoverRun, patterns, directory: Path) -> list[Path]:
    from lens_attn.render import plot_ablation, plot_head, plot_scores, save_figure

    written = []
    for name in HEATMAP_SCORES:
        if name in run.scores.values:
            written.append(
                save_figure(plot_scores(run.scores, name), directory / f"scores_{name}.png")
            )
    for key, sweep in run.confirmation.sweeps.items():
        written.append(
            save_figure(plot_ablation(sweep), directory / f"ablation_{key.replace('/', '__')}.png")
        )
    tops = {label: run.labels.heads_with(label) for label in SUMMARY_LABELS}
    for label, heads in tops.items():
        score = LABEL_SCORE[label]
        if heads:
            layer, head = max(heads, key=lambda h: float(run.scores[score][h]))
            fig = plot_head(patterns, layer, head)
            written.append(save_figure(fig, directory / f"top_{label}_L{layer}H{head}.png"))
    return written


def _write_run_json(run: DiscoverRun, model, source, batch_size: int, method: str) -> None:
    info = run_info(
        model, source, run.timings,
        probe_seed=run.scores.provenance.get("probe_seed"),
        probe_hash=run.scores.provenance.get("probe_hash"),
        batch_size=batch_size, ablation_method=method, thresholds=run.labels.thresholds,
        world_size=run.scores.provenance.get("world_size", 1),
        files=[str(p.relative_to(run.out)) for p in run.files],
    )  # fmt: skip
    write_run_json(run.out, info)
    run.files.append(run.out / "run.json")


def run_info(model, source, timings: dict, /, **extra) -> dict:
    """What ``run.json`` records of a command's run: the model, the versions, timings, ``extra``."""
    import lens_attn

    cfg = model.cfg
    fields = ("n_layers", "n_heads", "n_key_value_heads", "d_model", "d_head", "d_mlp", "d_vocab",
              "n_ctx")  # fmt: skip
    return {
        "model_source": source if source is not None else "bundled",
        "model_name": getattr(cfg, "model_name", None),
        "config": {k: getattr(cfg, k, None) for k in fields},
        "dtype": str(cfg.dtype),
        "device": str(cfg.device),
        "backend": type(model).__name__,
        "tokenizer": bos_info(model),  # which token is BOS, from the tokenizer
        **extra,
        "versions": {
            "lens_attn": lens_attn.__version__,
            "transformer_lens": _version("transformer-lens"),
            "torch": torch.__version__,
        },
        "timings_s": timings,
    }


def write_run_json(out: Path, info: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "run.json", json.dumps(info, indent=1, default=str))


def _version(dist_name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist_name)
    except PackageNotFoundError:
        return None
