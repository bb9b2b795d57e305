"""The ``lens-attn`` command line.

    lens-attn discover --out runs/demo
    lens-attn scores --out runs/scores --batch-size 32
    lens-attn ablate --heads L1H5,L0H0 --method mean --metric induction_loss --out runs/ablate
    lens-attn patterns "The cat sat on the mat. The cat sat" --layers 0,2 --out runs/cat
    lens-attn atlas --corpus texts/ --out runs/atlas     # no --corpus: the default corpus

Subcommands:

``discover``  the main job: score every head on the built-in probes, classify, confirm the labels
              with ablations, and write a run folder (``lens_attn.discover``).
``scores``    score every head; writes ``scores.csv``, ``scores.json``, ``labels.csv``, ``run.json``.
``ablate``    ablate chosen heads (or sweep every head) and measure a metric; writes ``ablation.csv``.
``atlas``     stream a corpus once and write the head atlas: ``index.html`` (a scatter of every head,
              one page per head in ``heads/``), ``atlas.csv`` (one row per head) (``lens_attn.atlas``).
``circuit``   which heads feed the induction heads (q, k, v) and which write the answer: a screen
              of every edge, exact path patching of the top ones, faithfulness; writes
              ``edges.csv``, ``circuit.json``, ``circuit.svg`` (``lens_attn.circuit``).
``patterns``  capture one prompt's attention patterns and write ``report.html`` (offline HTML), one
              PNG grid per layer (``layer<l>.png``), and print text heatmaps of the strongest heads.

All of them run unchanged under ``torchrun --nproc-per-node N``: the prompts are sharded over the
processes, the sums merged, and rank 0 writes the folder.

Every subcommand takes the shared options added by ``add_common_options`` (``--model``,
``--backend``, ``--device``, ``--dtype``, ``--out``, ``--debug``). Wrong options or values end with a
one-line usage error; expected errors print ``lens-attn: error: <message>`` on one line, without a
traceback (``--debug`` shows it): exit status 2 for bad input (``lens_attn.errors.LensAttnError``,
other ``ValueError``, a missing file or folder), 1 for other failures (``OSError``: a full disk, an
I/O error).

``discover``, ``scores`` and ``ablate`` write a run folder (``lens_attn.runs.RunFolder``): ``--out``
is checked and locked before the model is loaded, a folder holding a previous run is refused unless
``--overwrite``, and ``run.json`` is written last, as the marker that the run completed.
"""

import argparse
import sys
from pathlib import Path

from lens_attn.commands import (
    run_ablate,
    run_atlas,
    run_circuit,
    run_discover,
    run_patterns,
    run_scores,
)

PROG = "lens-attn"
BACKENDS = ("hooked", "bridge")  # lens_attn.loading.convert.Backend
DTYPES = ("float32", "bfloat16", "float16")  # lens_attn.loading.hf.DTypeName
# ablation.methods.METHODS but "patch" (it needs paired clean/corrupted prompts: library only)
ABLATION_METHODS = ("zero", "mean", "resample", "bos", "uniform")
# lens_attn.ablation.metrics.METRICS, written out so that building the parser imports no torch
METRICS = ("loss", "induction_loss", "copy_logprob", "logit_diff", "answers_logprob", "accuracy")
EXIT_ERROR = 2  # bad input: the same status argparse uses for usage errors
EXIT_FAILURE = 1  # anything else that went wrong (an OSError while writing, ...)


# -------------------------------------------------------------------------------- shared options


def add_common_options(parser: argparse.ArgumentParser, *, out_required: bool = True) -> None:
    """Add ``--model``, ``--backend``, ``--device``, ``--dtype`` and ``--out`` to a (sub)parser."""
    group = parser.add_argument_group("model and output")
    group.add_argument(
        "--model",
        metavar="SOURCE",
        default=None,
        help="bundled checkpoint (default), a Hugging Face Llama directory, a .gguf file, a Meta "
        "checkpoint directory, or a TransformerLens model name",
    )
    group.add_argument(
        "--backend", choices=BACKENDS, default=None,
        help="default: hooked on TransformerLens 3.9, bridge on 4 (which has no HookedTransformer)",
    )  # fmt: skip
    group.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:<index> or mps (default: cuda if available)"
    )
    group.add_argument("--dtype", choices=DTYPES, default=None, help="default: float32")
    group.add_argument(
        "--n-devices", type=positive_int, default=1, metavar="K",
        help="split the layers over K GPUs (needs a CUDA device; default: %(default)s)",
    )  # fmt: skip
    group.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        required=out_required,
        default=None,
        help="output directory (created if missing)",
    )
    group.add_argument(
        "--quiet",
        action="store_true",
        help="no progress reports (otherwise a bar per stage on a terminal, one line per stage "
        "with its time elsewhere)",
    )
    group.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,  # so that ``lens-attn --debug <command>`` works too
        help="show the traceback of an error",
    )


def head_list(text: str) -> list[str]:
    """``"L1H3, L0H2"`` -> ``["L1H3", "L0H2"]`` (checked against the model later, in lens_attn.heads)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def _add_overwrite(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous run in --out (its outputs are removed first); without it such a "
        "folder is refused",
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
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {value}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


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
    _add_corpus(parser, "also build the head atlas of this corpus into DIR/atlas/ (see the atlas "
                "command), with the labels and their confirmations on each head's page")  # fmt: skip
    parser.add_argument("--circuit", action="store_true", help="also find what feeds the confirmed "
                        "induction heads (lens-attn circuit; edges.csv, circuit.json)")  # fmt: skip
    parser.add_argument("--full", action="store_true", help="confirm every labelled head with its "
                        "own tests on --confirm-prompts prompts, ignoring --ablation-budget "
                        "(SmolLM2: about 2.5x the default run's ablations)")  # fmt: skip
    _add_overwrite(parser)
    add_common_options(parser)
    parser.set_defaults(func=run_discover, command_parser=parser)


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
    _add_overwrite(parser)
    add_common_options(parser)
    parser.set_defaults(func=run_scores, command_parser=parser)


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
        type=head_list,
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
        choices=("repeated_random", "natural", "repeated_tokens", "ioi"),
        default=None,
        help="probe set (default: repeated_random for induction_loss, ioi for logit_diff, else "
        "natural)",
    )
    _add_overwrite(parser)
    add_common_options(parser)
    parser.set_defaults(func=run_ablate, command_parser=parser)


# ------------------------------------------------------------------------------------------ atlas


def _add_corpus(parser, help_text: str) -> None:
    parser.add_argument("--corpus", type=Path, default=None, metavar="PATH", help=help_text)


def _add_atlas(subparsers) -> None:
    parser = subparsers.add_parser(
        "atlas",
        help="what every head does across a corpus: DIR/index.html, one page per head",
        description="Stream a corpus through the model once and write the head atlas: "
        "DIR/index.html (offline; a scatter of every head, one page per head under DIR/heads/), "
        "DIR/atlas.csv (one row per head) and DIR/run.json.",
    )
    _add_corpus(parser, "a text file, a folder of .txt files, a .jsonl file with a 'text' field, "
                "or a saved `datasets` dataset (default: the built-in corpus, generated offline)")  # fmt: skip
    parser.add_argument("--k", type=positive_int, default=20, metavar="K",
                        help="top examples kept per head (default: %(default)s)")  # fmt: skip
    parser.add_argument("--window", type=positive_int, default=None, metavar="T",
                        help="tokens per window (default: the model's context)")  # fmt: skip
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="chooses the decile samples (default: %(default)s)")  # fmt: skip
    _add_batch_size(parser, default=8)
    _add_overwrite(parser)
    add_common_options(parser)
    parser.set_defaults(func=run_atlas, command_parser=parser)


def _add_circuit(subparsers) -> None:
    parser = subparsers.add_parser(
        "circuit",
        help="find which heads feed which (path patching); write edges.csv and circuit.json",
        description="Screen every head-to-head edge into the induction heads (or --receivers), "
        "measure the top ones exactly by path patching, and test the circuit's faithfulness.",
    )
    _add_batch_size(parser)
    parser.add_argument(
        "--receivers",
        type=head_list,
        default=None,
        metavar="L17H3,L18H6",
        help="receiver heads (default: every head scoring >= 0.4 on induction)",
    )
    parser.add_argument("--top-k", type=positive_int, default=40, help="edges path-patched "
                        "exactly, the screen's top ones (default: %(default)s)")  # fmt: skip
    parser.add_argument("--top-logits", type=non_negative_int, default=10, help="direct edges to "
                        "the logits path-patched exactly (default: %(default)s)")  # fmt: skip
    parser.add_argument(
        "--method", choices=("mean", "zero"), default="mean",
        help="what a cut sender outputs (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--n-per-period", type=positive_int, default=16,
                        help="induction probes per period (23 and 41; default: %(default)s)")  # fmt: skip
    parser.add_argument("--no-faithfulness", action="store_true",
                        help="skip the faithfulness test (3 forward passes per batch)")  # fmt: skip
    _add_overwrite(parser)
    add_common_options(parser)
    parser.set_defaults(func=run_circuit, command_parser=parser)


# ------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Find, label, test and draw the attention heads of Llama 2 family models.",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_discover(subparsers)
    _add_scores(subparsers)
    _add_ablate(subparsers)
    _add_circuit(subparsers)
    _add_patterns(subparsers)
    _add_atlas(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lens-attn`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args, args.command_parser)
    except (ValueError, OSError) as error:  # LensAttnError is a ValueError
        if args.debug:
            import traceback

            traceback.print_exc()
        print(f"{PROG}: error: {error_line(error)}", file=sys.stderr)
        return exit_status(error)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # started by score_heads under torchrun
            dist.destroy_process_group()


def error_line(error: BaseException) -> str:
    """``error`` as one line: its message (or its type when it has none), newlines folded."""
    text = str(error) if str(error) else type(error).__name__
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.filename}: {error.strerror}"  # "[Errno 28] ..." -> "<path>: No space ..."
    return " ".join(text.split())


def exit_status(error: BaseException) -> int:
    """2 for bad input (a wrong value, a missing or wrong path), 1 for other failures."""
    bad_path = (FileNotFoundError, NotADirectoryError, IsADirectoryError)
    return EXIT_ERROR if isinstance(error, (ValueError, *bad_path)) else EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
