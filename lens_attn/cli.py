"""The ``lens-attn`` command line.

    lens-attn patterns "The cat sat on the mat. The cat sat" --layers 0,2 --out runs/cat

Subcommands:

``patterns``  capture one prompt's attention patterns and write ``report.html`` (offline HTML), one
              PNG grid per layer (``layer<l>.png``), and print text heatmaps of the strongest heads.

Every subcommand takes the shared options added by ``add_common_options`` (``--model``,
``--backend``, ``--device``, ``--dtype``, ``--out``). Wrong options or values end with a one-line
usage error; expected errors from the library (a missing file, an invalid value) print ``lens-attn:
error: <message>`` and exit with status 2, without a traceback.
"""

import argparse
import sys
from pathlib import Path

PROG = "lens-attn"
BACKENDS = ("hooked", "bridge")  # lens_attn.loading.Backend
DTYPES = ("float32", "bfloat16", "float16")  # lens_attn.loading.DTypeName
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
        "--out",
        metavar="DIR",
        type=Path,
        required=out_required,
        default=None,
        help="output directory (created if missing)",
    )


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


def load_from_args(args: argparse.Namespace):
    """The model the shared options describe, via ``lens_attn.loading.load_model``."""
    from lens_attn.loading import load_model

    return load_model(args.model, backend=args.backend, device=args.device, dtype=args.dtype)


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
        "--layers",
        type=parse_layers,
        default=None,
        metavar="L,L",
        help="layers to capture, e.g. 0,2 (default: all)",
    )
    parser.add_argument(
        "--show",
        type=non_negative_int,
        default=3,
        metavar="K",
        help="print text heatmaps of the K strongest heads (default: %(default)s)",
    )
    parser.add_argument(
        "--scores",
        type=Path,
        default=None,
        metavar="DIR",
        help="a HeadScores directory (scores.json) for the report's score grid",
    )
    parser.add_argument(
        "--rank-by",
        default=None,
        metavar="SCORE",
        help="rank heads by this score from --scores instead of by their patterns",
    )
    parser.add_argument("--title", default=None, help="report title (default: the prompt)")
    add_common_options(parser)
    parser.set_defaults(func=run_patterns, command_parser=parser)


def run_patterns(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.rank_by is not None and args.scores is None:
        parser.error("--rank-by needs --scores DIR")
    scores = None
    if args.scores is not None:
        from lens_attn.results import HeadScores

        scores = HeadScores.load(args.scores)
        if args.rank_by is not None and args.rank_by not in scores.values:
            raise ValueError(
                f"--rank-by: no score named {args.rank_by!r}; {args.scores} has: "
                f"{', '.join(scores.values)}"
            )

    from lens_attn.patterns import capture_patterns
    from lens_attn.render import plot_layer, save_figure
    from lens_attn.report import render_report
    from lens_attn.terminal import strongest_heads, text_heatmap

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
            title=f"L{layer}H{head} ({value:.2f})",
        )
        print(f"\n{heatmap}")
    print()
    for path in written:
        print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Find, label, test and draw the attention heads of Llama 2 family models.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
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


if __name__ == "__main__":
    sys.exit(main())
