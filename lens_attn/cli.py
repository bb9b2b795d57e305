"""The ``lens-attn`` command line.

    lens-attn discover --out runs/demo
    lens-attn scores --out runs/scores --batch-size 32
    lens-attn ablate --heads L1H5,L0H0 --method mean --metric induction_loss --out runs/ablate
    lens-attn patterns "The cat sat on the mat. The cat sat" --layers 0,2 --out runs/cat

Subcommands:

``discover``  the main job: score every head on the built-in probes, classify, confirm the labels
              with ablations, and write a run folder (``lens_attn.discover``).
``scores``    score every head; writes ``scores.csv``, ``scores.json``, ``labels.csv``, ``run.json``.
``ablate``    ablate chosen heads (or sweep every head) and measure a metric; writes ``ablation.csv``.
``patterns``  capture one prompt's attention patterns and write ``report.html`` (offline HTML), one
              PNG grid per layer (``layer<l>.png``), and print text heatmaps of the strongest heads.

All of them run unchanged under ``torchrun --nproc-per-node N``: the prompts are sharded over the
processes, the sums merged, and rank 0 writes the folder.

Every subcommand takes the shared options added by ``add_common_options`` (``--model``,
``--backend``, ``--device``, ``--dtype``, ``--out``). Wrong options or values end with a one-line
usage error; expected errors from the library (a missing file, an invalid value) print ``lens-attn:
error: <message>`` and exit with status 2, without a traceback.
"""

import argparse
import sys
from pathlib import Path

PROG = "lens-attn"
BACKENDS = ("hooked", "bridge")  # lens_attn.loading.convert.Backend
DTYPES = ("float32", "bfloat16", "float16")  # lens_attn.loading.hf.DTypeName
ABLATION_METHODS = ("zero", "mean", "resample", "bos", "uniform")  # ablation.methods.METHODS
# lens_attn.ablation.metrics.METRICS, written out so that building the parser imports no torch
METRICS = ("loss", "induction_loss", "logit_diff", "accuracy")
EXIT_ERROR = 2  # the same status argparse uses for usage errors


# -------------------------------------------------------------------------------- shared options


def add_common_options(parser: argparse.ArgumentParser, *, out_required: bool = True) -> None:
    """Add ``--model``, ``--backend``, ``--device``, ``--dtype`` and ``--out`` to a (sub)parser."""
    group = parser.add_argument_group("model and output")
    group.add_argument(
        "--model",
        metavar="SOURCE",
        default=None,
        help="bundled checkpoint (default), a Hugging Face Llama directory, a Meta checkpoint "
        "directory, or a TransformerLens model name",
    )
    group.add_argument("--backend", choices=BACKENDS, default="hooked", help="default: %(default)s")
    group.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:<index> or mps (default: cuda if available)"
    )
    group.add_argument("--dtype", choices=DTYPES, default=None, help="default: float32")
    group.add_argument(
        "--n-devices", type=positive_int, default=1, metavar="K",
        help="split the layers over K GPUs (needs a CUDA device; default: %(default)s)",
    )  # fmt: skip
    group.add_argument(
        "--out", metavar="DIR", type=Path, required=out_required, default=None,
        help="output directory (created if missing)",
    )  # fmt: skip


def parse_layers(text: str) -> list[int]:
    """``"0,2"`` -> ``[0, 2]`` (an argparse ``type``)."""
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer numbers like 0,2, got {text!r}"
        ) from None
    if not layers or any(layer < 0 for layer in layers):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer numbers >= 0 like 0,2, got {text!r}"
        )
    return layers


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def positive_int(text: str) -> int:
    value = non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def load_from_args(args: argparse.Namespace):
    """The model the shared options describe, via ``lens_attn.loading.load_model``."""
    from lens_attn import distributed
    from lens_attn.loading import load_model

    # under torchrun, "cuda" (or no --device on a GPU machine) means this rank's own GPUs
    device = distributed.process_device(args.device, n_devices=args.n_devices)
    return load_model(
        args.model, backend=args.backend, device=device, dtype=args.dtype, n_devices=args.n_devices
    )


# ---------------------------------------------------------------------------------------- patterns


def _add_patterns(subparsers) -> None:
    parser = subparsers.add_parser(
        "patterns",
        help="capture a prompt's attention patterns: HTML report, PNG grids, text heatmaps",
        description="Capture the attention patterns of one prompt and write DIR/report.html "
        "(offline), DIR/layer<l>.png (every head of a layer) and print heatmaps of the "
        "strongest heads.",
    )
    parser.add_argument("prompt", metavar="PROMPT", help="the prompt (BOS is prepended)")
    parser.add_argument(
        "--layers", type=parse_layers, default=None, metavar="L,L",
        help="layers to capture, e.g. 0,2 (default: all)",
    )  # fmt: skip
    parser.add_argument(
        "--show", type=non_negative_int, default=3, metavar="K",
        help="print text heatmaps of the K strongest heads (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--scores", type=Path, default=None, metavar="DIR",
        help="a HeadScores directory (scores.json) for the report's score grid",
    )  # fmt: skip
    parser.add_argument(
        "--rank-by", default=None, metavar="SCORE",
        help="rank heads by this score from --scores instead of by their patterns",
    )  # fmt: skip
    parser.add_argument("--title", default=None, help="report title (default: the prompt)")
    add_common_options(parser)
    parser.set_defaults(func=run_patterns, command_parser=parser)


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


# --------------------------------------------------------------------------- discover, scores, ablate


def _add_batch_size(parser, default: int = 16) -> None:
    parser.add_argument(
        "--batch-size", type=positive_int, default=default, metavar="N",
        help="prompts per forward pass (default: %(default)s)",
    )  # fmt: skip


def _add_query_chunk(parser) -> None:
    parser.add_argument(
        "--query-chunk", type=positive_int, default=None, metavar="C",
        help="score in blocks of C query rows, never building a full pattern (long prompts)",
    )  # fmt: skip


def _add_discover(subparsers) -> None:
    parser = subparsers.add_parser(
        "discover",
        help="the main job: score, classify and confirm every head; write a run folder",
        description="Score every head on the built-in probes, label them, confirm the labels with "
        "ablations, and write DIR/{scores.csv,scores.json,labels.csv,ablation.csv,report.html,"
        "run.json} and DIR/figures/.",
    )
    _add_batch_size(parser)
    parser.add_argument("--method", choices=ABLATION_METHODS, default="zero",
                        help="ablation used to confirm labels (default: %(default)s)")  # fmt: skip
    _add_query_chunk(parser)
    for flag, default, metavar, text in (
        ("--memory-budget", 1024, "MB", "memory cap of one ablation pass; sets how many ablations share it"),
        ("--ablation-budget", 60, "S", "seconds the confirming ablations may take; the plan gives fewer "
         "heads their own tests, then uses fewer prompts (>= 8), to fit"),
        ("--confirm-prompts", 16, "N", "prompts of each probe set the confirming ablations run on"),
        ("--threads", None, "N", "CPU threads for torch (default: torch's own; see the README)"),
    ):  # fmt: skip
        parser.add_argument(flag, type=positive_int, default=default, metavar=metavar,
                            help=text + (" (default: %(default)s)" if default else ""))  # fmt: skip
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    add_common_options(parser)
    parser.set_defaults(func=run_discover, command_parser=parser)


def run_discover(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from lens_attn import distributed
    from lens_attn.discover import discover

    if args.threads is not None:
        __import__("torch").set_num_threads(args.threads)
    model = load_from_args(args)
    run = discover(
        model, args.out, source=args.model, batch_size=args.batch_size, method=args.method,
        query_chunk=args.query_chunk, memory_budget_mb=args.memory_budget,
        confirm_prompts=args.confirm_prompts, ablation_budget_s=args.ablation_budget, log=print,
        figures=not args.no_figures,
    )  # fmt: skip
    if distributed.is_main():
        print(run.summary())
        timings = ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in run.timings.items())
        print(f"\n{len(run.files)} files in {args.out} ({timings})")
        print(
            f"open {args.out / 'report.html'} in a browser; the table is {args.out / 'scores.csv'}"
        )
    return 0


def _add_scores(subparsers) -> None:
    parser = subparsers.add_parser(
        "scores",
        help="score every head; write scores.csv, scores.json, labels.csv",
        description="Score every head with every built-in score (or --scores) on the built-in "
        "probes, or on the prompts of a text file (one per line).",
    )
    _add_batch_size(parser)
    parser.add_argument(
        "--scores",
        type=lambda t: [x for x in t.split(",") if x],
        default=None,
        metavar="NAME,NAME",
        help="scores to compute (default: every built-in)",
    )
    parser.add_argument(
        "--prompts",
        type=Path,
        default=None,
        metavar="FILE",
        help="a text file with one prompt per line (default: the built-in probes)",
    )
    parser.add_argument(
        "--normalize",
        choices=("target_rows", "all_rows"),
        default="target_rows",
        help="default: %(default)s",
    )
    _add_query_chunk(parser)
    add_common_options(parser)
    parser.set_defaults(func=run_scores, command_parser=parser)


def _read_prompts(path: Path | None) -> list[str] | None:
    if path is None:
        return None
    if not path.is_file():
        raise FileNotFoundError(f"--prompts: {path} does not exist")
    prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts: {path} has no non-empty lines")
    return prompts


def run_scores(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import time

    from lens_attn import distributed
    from lens_attn.render.terminal import score_table
    from lens_attn.runs import write_atomic
    from lens_attn.scoring.runner import score_heads

    model = load_from_args(args)
    start = time.perf_counter()
    scores = score_heads(
        model,
        _read_prompts(args.prompts),
        scores=args.scores,
        batch_size=args.batch_size,
        normalize=args.normalize,
        query_chunk=args.query_chunk,
        progress=distributed.is_main(),
    )
    if not distributed.is_main():
        return 0
    scores.save(args.out)
    write_atomic(args.out / "labels.csv", scores.classify().to_dataframe().to_csv(index=False))
    _write_run(args, model, {"scores_s": time.perf_counter() - start}, scores.provenance)
    print(score_table(scores, top=12))
    print(f"\nwrote {args.out / 'scores.csv'}, scores.json, labels.csv, run.json")
    return 0


def _add_ablate(subparsers) -> None:
    parser = subparsers.add_parser(
        "ablate",
        help="ablate heads and measure a metric; write ablation.csv",
        description="Ablate each unit (a head such as L1H3, or a layer such as L1) alone and "
        "measure the metric on the probes; without --heads, sweep every head.",
    )
    _add_batch_size(parser, default=32)
    parser.add_argument(
        "--heads",
        type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
        default=None,
        metavar="L1H3,L0H2",
        help="units to ablate one at a time (default: every head)",
    )
    parser.add_argument(
        "--method", choices=ABLATION_METHODS, default="zero", help="default: %(default)s"
    )
    parser.add_argument(
        "--metric", choices=METRICS, default="induction_loss", help="default: %(default)s"
    )
    parser.add_argument(
        "--probes",
        choices=("repeated_random", "natural", "repeated_tokens"),
        default=None,
        help="probe set (default: repeated_random for induction_loss, else natural)",
    )
    add_common_options(parser)
    parser.set_defaults(func=run_ablate, command_parser=parser)


def run_ablate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import time

    from lens_attn import distributed
    from lens_attn.ablation.confirm import default_probes
    from lens_attn.ablation.sweep import ablation_sweep
    from lens_attn.runs import write_atomic

    if args.metric == "logit_diff":
        parser.error("--metric logit_diff needs answer tokens; use the Python API (ablation_sweep)")
    model = load_from_args(args)
    kind = args.probes or ("repeated_random" if args.metric == "induction_loss" else "natural")
    probes = default_probes(model)[kind]
    start = time.perf_counter()
    result = ablation_sweep(
        model,
        probes,
        method=args.method,
        metric=args.metric,
        heads=args.heads,
        reference=probes if args.method in ("mean", "resample") else None,
        max_batch=max(args.batch_size, 1) * 8,
        progress=distributed.is_main(),
    )
    if not distributed.is_main():
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    table = result.to_dataframe()
    write_atomic(args.out / "ablation.csv", table.to_csv(index=False))
    result.save(args.out / "ablation")
    _write_run(args, model, {"ablation_s": time.perf_counter() - start}, {"probes": kind})
    print(
        table.sort_values("delta", ascending=False)
        .head(12)
        .to_string(index=False, float_format="%.4f")
    )
    print(f"\nwrote {args.out / 'ablation.csv'}, ablation/, run.json")
    return 0


def _write_run(args: argparse.Namespace, model, timings: dict, extra: dict) -> None:
    from lens_attn.runs import run_info, write_run_json

    info = run_info(model, args.model, timings, command=args.command,
                    batch_size=getattr(args, "batch_size", None), **extra)  # fmt: skip
    write_run_json(args.out, info)


# ------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Find, label, test and draw the attention heads of Llama 2 family models.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_discover(subparsers)
    _add_scores(subparsers)
    _add_ablate(subparsers)
    _add_patterns(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lens-attn`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args, args.command_parser)
    except (FileNotFoundError, ValueError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # started by score_heads under torchrun
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
