"""What each ``lens-attn`` subcommand does, once ``lens_attn.cli`` has parsed its arguments.

Each ``run_<command>(args, parser)`` returns the exit status. Heavy imports (torch, TransformerLens)
happen inside the functions, so building the parser stays light.
"""

import argparse
import time
from pathlib import Path


def open_run_folder(args: argparse.Namespace):
    """The ``RunFolder`` for ``--out`` (validated and locked now, before any model is loaded).

    Under ``torchrun`` only rank 0 writes, so the other ranks get a no-op context.
    """
    import contextlib
    import os

    from lens_attn.runs import RunFolder

    if int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext(None)
    return RunFolder(args.out, overwrite=args.overwrite)


def load_from_args(args: argparse.Namespace):
    """The model the shared options describe, via ``lens_attn.loading.load_model``."""
    from lens_attn import distributed
    from lens_attn.loading import load_model

    # under torchrun, "cuda" (or no --device on a GPU machine) means this rank's own GPUs
    device = distributed.process_device(args.device, n_devices=args.n_devices)
    return load_model(
        args.model, backend=args.backend, device=device, dtype=args.dtype,
        n_devices=args.n_devices, progress=show_progress(args),
    )  # fmt: skip


def show_progress(args: argparse.Namespace) -> bool:
    """Progress reports (``lens_attn.progress``) unless ``--quiet``, and only on the main rank."""
    from lens_attn import distributed

    return distributed.is_main() and not getattr(args, "quiet", False)


def run_patterns(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.rank_by is not None and args.scores is None:
        parser.error("--rank-by needs --scores DIR")
    scores = None
    if args.scores is not None:
        from lens_attn.scoring.results import HeadScores

        scores = HeadScores.load(args.scores)
        if args.rank_by is not None:
            scores.check_score(args.rank_by)

    from lens_attn.heads import head_label
    from lens_attn.patterns import capture_patterns
    from lens_attn.render.figures import plot_layer, save_figure
    from lens_attn.render.report import render_report
    from lens_attn.render.terminal import strongest_heads, text_heatmap
    from lens_attn.runs import check_out_dir

    check_out_dir(args.out)  # before the model is loaded
    model = load_from_args(args)
    patterns = capture_patterns(model, [args.prompt], layers=args.layers)
    if args.rank_by is not None:
        everything = scores.top(args.rank_by, k=scores.n_layers * scores.n_heads)
        ranked = [(layer, head, v) for layer, head, v in everything if layer in patterns.layers]
        how = f"highest {args.rank_by}"
    else:
        ranked = strongest_heads(patterns, len(patterns.layers) * patterns.n_heads)
        how = "sharpest attention off BOS and the diagonal"

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    title = args.title if args.title is not None else f"lens-attn: {args.prompt}"
    open_head = ranked[0][:2] if ranked else None  # the report opens on the strongest head
    report = render_report(
        patterns, scores, path=out / "report.html", title=title, open_head=open_head
    )
    written = [report]
    for layer in patterns.layers:
        written.append(save_figure(plot_layer(patterns, layer), out / f"layer{layer}.png"))

    shown = ranked[: args.show]
    if shown:
        print(f"strongest heads ({how}):")
    for layer, head, value in shown:
        heatmap = text_heatmap(
            patterns.head(layer, head),
            patterns.str_tokens[0],
            title=f"{head_label(layer, head)} ({value:.2f})",
        )
        print(f"\n{heatmap}")
    print()
    for path in written:
        print(f"wrote {path}")
    return 0


def run_discover(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from lens_attn import distributed
    from lens_attn.discover import discover

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    corpus = _corpus(args)  # a missing --corpus fails before the model is loaded
    with open_run_folder(args) as folder:
        start = time.perf_counter()
        model = load_from_args(args)
        load_s = time.perf_counter() - start
        if distributed.is_main():
            print(f"loaded {args.model or 'the bundled model'} in {load_s:.1f}s")
        run = discover(
            model, folder if folder is not None else args.out, source=args.model,
            batch_size=args.batch_size, method=args.method, query_chunk=args.query_chunk,
            memory_budget_mb=args.memory_budget, confirm_prompts=args.confirm_prompts,
            ablation_budget_s=args.ablation_budget, log=print, figures=not args.no_figures,
            corpus=corpus,
            progress=show_progress(args),
            circuit=args.circuit, full=args.full,
        )  # fmt: skip
    if distributed.is_main():
        print(run.summary())
        stages = {"load_s": load_s, **run.timings}
        timings = ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in stages.items())
        print(f"\n{len(run.files)} files in {args.out} ({timings})")
        print(
            f"open {args.out / 'report.html'} in a browser; the table is {args.out / 'scores.csv'}"
        )
        if run.atlas is not None:
            print(f"the head atlas of --corpus: {args.out / 'atlas' / 'index.html'}")
    return 0


def _corpus(args: argparse.Namespace):
    """``--corpus`` read lazily (``lens_attn.atlases.corpus.read_corpus``), or None without it."""
    if getattr(args, "corpus", None) is None:
        return None
    from lens_attn.atlases.corpus import read_corpus

    return read_corpus(args.corpus)


def _read_prompts(path: Path | None) -> list[str] | None:
    from lens_attn.errors import InputError
    from lens_attn.validation import read_text_file

    if path is None:
        return None
    if path.is_dir():
        raise InputError(f"--prompts: {path} is a folder; give a text file with one prompt a line")
    if not path.is_file():
        raise FileNotFoundError(f"--prompts: {path} does not exist")
    text = read_text_file(path, what="--prompts:")  # InputError naming a non-UTF-8 file
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"--prompts: {path} has no non-empty lines")
    return prompts


def run_scores(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from lens_attn.render.terminal import score_table
    from lens_attn.scoring.runner import score_heads

    prompts = _read_prompts(args.prompts)
    with open_run_folder(args) as folder:
        model = load_from_args(args)
        start = time.perf_counter()
        scores = score_heads(
            model,
            prompts,
            scores=args.scores,
            batch_size=args.batch_size,
            normalize=args.normalize,
            query_chunk=args.query_chunk,
            progress=show_progress(args),
        )
        if folder is None:
            return 0
        scores.save(folder.out)
        folder.record("scores.csv", "scores.json")
        folder.write_text("labels.csv", scores.classify().to_dataframe().to_csv(index=False))
        _write_run(
            args, folder, model, {"scores_s": time.perf_counter() - start}, scores.provenance
        )
    print(score_table(scores, top=12))
    print(f"\nwrote {args.out / 'scores.csv'}, scores.json, labels.csv, run.json")
    return 0


def run_ablate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from lens_attn.ablation.confirm import default_probes
    from lens_attn.ablation.sweep import ablation_sweep
    from lens_attn.errors import InputError

    default_kind = {"induction_loss": "repeated_random", "logit_diff": "ioi",
                    "answers_logprob": "ioi"}  # fmt: skip
    kind = args.probes or default_kind.get(args.metric, "natural")
    if args.metric in ("logit_diff", "answers_logprob") and kind != "ioi":
        parser.error(
            f"--metric {args.metric} needs answer tokens: use --probes ioi (the IOI sentences "
            "carry theirs) or the Python API (ablation_sweep(..., answer_tokens=...))"
        )
    with open_run_folder(args) as folder:
        model = load_from_args(args)
        probe_sets = default_probes(model)
        if kind not in probe_sets:
            raise InputError(
                f"--probes {kind}: this model's vocabulary has no two one-token names to build IOI "
                f"sentences from; use one of {', '.join(probe_sets)}"
            )
        probes = probe_sets[kind]
        start = time.perf_counter()
        result = ablation_sweep(
            model,
            probes,
            method=args.method,
            metric=args.metric,
            heads=args.heads,
            reference=probes if args.method in ("mean", "resample") else None,
            max_batch=max(args.batch_size, 1) * 8,
            progress=show_progress(args),
        )
        if folder is None:
            return 0
        table = result.to_dataframe()
        folder.write_text("ablation.csv", table.to_csv(index=False))
        result.save(folder.out / "ablation")
        folder.record("ablation/ablation.csv", "ablation/ablation.json")
        _write_run(
            args, folder, model, {"ablation_s": time.perf_counter() - start}, {"probes": kind}
        )
    print(
        table.sort_values("delta", ascending=False)
        .head(12)
        .to_string(index=False, float_format="%.4f")
    )
    print(f"\nwrote {args.out / 'ablation.csv'}, ablation/, run.json")
    return 0


def run_circuit(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from lens_attn.ablation.confirm import default_probes
    from lens_attn.circuits import circuit
    from lens_attn.heads import head_label
    from lens_attn.probes import induction_probes
    from lens_attn.scoring.probe_sets import score_probe_sets
    from lens_attn.scoring.results import LABEL_PROBES

    with open_run_folder(args) as folder:
        model = load_from_args(args)
        start = time.perf_counter()
        # the heads' labels, to colour the graph: each label read on the probes that define it
        scored = {k: v for k, v in default_probes(model).items() if k in LABEL_PROBES.values()}
        grid = score_probe_sets(model, scored, batch_size=args.batch_size, progress=False)
        labels = {head_label(*h): list(x) for h, x in grid.classify().labels.items() if x}
        result = circuit(
            model,
            args.receivers,
            labels=labels,
            probes=induction_probes(model, n_per_period=args.n_per_period),
            method=args.method,
            top_k=args.top_k,
            top_logits=args.top_logits,
            faithfulness=not args.no_faithfulness,
            batch_size=args.batch_size,
            progress=True,
        )
        if folder is None:
            return 0
        from lens_attn.render.circuit_graph import circuit_svg

        for name, text in {**result.files(), "circuit.svg": circuit_svg(result)}.items():
            folder.write_text(name, text)
        _write_run(args, folder, model, {"circuit_s": time.perf_counter() - start}, {})
    print(result.summary())
    print(f"\nwrote {args.out / 'edges.csv'}, circuit.json, circuit.svg, run.json")
    return 0


def _write_run(args: argparse.Namespace, folder, model, timings: dict, extra: dict) -> None:
    """``run.json``, written last: the marker that this command's run completed."""
    from lens_attn.runs import run_info

    info = run_info(model, args.model, timings, command=args.command,
                    batch_size=getattr(args, "batch_size", None), **extra)  # fmt: skip
    folder.complete(info)


def run_atlas(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from lens_attn import distributed
    from lens_attn.atlases import atlas
    from lens_attn.render.atlas import render_atlas

    texts = _corpus(args)  # checked before the model is loaded
    with open_run_folder(args) as folder:
        start = time.perf_counter()
        model = load_from_args(args)
        timings = {"load_s": time.perf_counter() - start}
        say = print if distributed.is_main() else (lambda *_: None)
        say(f"loaded {args.model or 'the bundled model'} in {timings['load_s']:.1f}s")
        start = time.perf_counter()
        head_atlas = atlas(model, texts, k=args.k, batch_size=args.batch_size, window=args.window,
                           seed=args.seed, progress=distributed.is_main(), log=say)  # fmt: skip
        timings["atlas_s"] = time.perf_counter() - start
        if folder is None:
            return 0
        start = time.perf_counter()
        for name, text in head_atlas.files().items():  # atlas.csv, atlas.json (HeadAtlas.load)
            folder.write_text(name, text)
        title = f"lens-attn atlas: {args.model or 'the bundled model'}"
        page = render_atlas(head_atlas, folder.out, folder=folder, title=title)
        timings["write_s"] = time.perf_counter() - start
        say(
            f"page: {head_atlas.n_layers * head_atlas.n_heads} head pages in {timings['write_s']:.1f}s"
        )
        corpus = str(args.corpus) if args.corpus is not None else "default"
        _write_run(args, folder, model, timings, {"corpus": corpus, **head_atlas.provenance})
    print(f"\nopen {page} in a browser; the table is {args.out / 'atlas.csv'}")
    return 0
