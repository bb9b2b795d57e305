"""Benchmark long prompts: peak memory and time of full-pattern vs query-chunked ``score_heads``.

    python experiments/bench_long.py          # T = 512, 1024, 2048; 1-3 minutes on 2 cores

On TransformerLens 4 the same stack is a ``TransformerBridge`` (``benchmarking.llama_shaped``); the
script prints which TransformerLens and model class it measured.

The model is a Llama-2-shaped layer stack with random weights (``--layers`` layers, d_model 512,
8 query heads of 64 sharing 2 key/value heads, SwiGLU 1376, RMSNorm, rotary; n_ctx = the longest T),
scored on one prompt of T random tokens (batch 1) with every built-in pattern score.

- ``full``: the normal forward; TransformerLens builds each layer's ``[1, 8, T, T]`` pattern (and
  its scores, masks and softmax intermediates of the same size), so its peak grows with T².
- ``chunked``: ``score_heads(..., query_chunk=C)``; blocks of C query rows, so nothing is T x T.
- ``forward only``: the chunked forward with no scores at all: the model's own activations
  (residual stream, q/k/v, MLP), which grow linearly with T whatever the scoring does.

Peak memory is measured two ways. ``rss``: the process's peak resident set above what was in use
before the call (``benchmarking.peak_extra_memory``); it also moves with the C heap's
state by several MiB, and reads ~0 for a small run served from memory an earlier run freed.
``tensors``: the peak of live tensor bytes above those alive before, from the allocations and
frees ``torch.profiler`` records (``profile_memory=True``); deterministic, and what CUDA's caching
allocator would have to hold. Times are medians of interleaved runs (``interleaved_times``).
Writes a table to stdout, ``experiments/results/bench_long.json`` and
``experiments/figures/bench_long.png``.
"""

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch
from benchmarking import interleaved_times, llama_shaped, peak_extra_memory

import lens_attn
from lens_attn.compat import TL_VERSION, HookedTransformer  # a TransformerBridge on TL 4
from lens_attn.files import open_atomic, write_text_atomic
from lens_attn.scoring import chunked
from lens_attn.scoring.builtin import BUILTIN_SCORES
from lens_attn.scoring.registry import registered

PATTERN_SCORES = [  # the chunkable pattern scores (not the weight scores, name_mover, retrieval)
    name
    for name in BUILTIN_SCORES
    if registered()[name].hooks == ("pattern",) and registered()[name].chunkable
]
MIB = 2**20


def llama_stack(n_layers: int, n_ctx: int) -> HookedTransformer:
    """Random-init Llama-2-shaped blocks, 1/8 of 7B's width (d_model 512, 8 heads of 64, GQA)."""
    return llama_shaped(
        n_layers,
        d_model=512,
        n_heads=8,
        n_key_value_heads=2,
        d_mlp=1376,  # 7B's 11008 / 8
        d_vocab=1000,  # small: the unembedding is not what this measures
        n_ctx=n_ctx,
    )


def tensor_peak_bytes(fn) -> int:
    """Peak live tensor bytes allocated by ``fn()`` (allocations minus frees, in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    # an op's self memory is its output minus what it freed; count it when the op ends
    for event in sorted(prof.events(), key=lambda e: e.time_range.end):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def measure(model, n_pos: int, query_chunk: int, repeats: int, memory_repeats: int) -> dict:
    tokens = torch.randint(
        3, model.cfg.d_vocab, (1, n_pos), generator=torch.Generator().manual_seed(n_pos)
    )
    tokens[:, 0] = 1  # BOS

    def full():
        return lens_attn.score_heads(
            model, tokens, scores=PATTERN_SCORES, batch_size=1, progress=False
        )

    def chunk():
        return lens_attn.score_heads(
            model,
            tokens,
            scores=PATTERN_SCORES,
            batch_size=1,
            query_chunk=query_chunk,
            progress=False,
        )

    @torch.no_grad()
    def forward_only():
        with chunked.chunked_attention(model, query_chunk, lambda layer, blocks: None):
            model(tokens, return_type=None)

    runs = {"full": full, "chunked": chunk, "forward_only": forward_only}
    # timing first: its warm-up call also warms (lazy imports, rotary tables) what is measured next
    times = interleaved_times({"full": full, "chunked": chunk}, repeats=repeats)
    forward_only()
    row = {"T": n_pos, "full_s": times["full"], "chunked_s": times["chunked"]}
    # the resident set also depends on the heap's state: the median of a few runs, in turn
    peaks: dict[str, list[int]] = {name: [] for name in runs}
    results = {}
    for _ in range(memory_repeats):
        for name, fn in runs.items():
            results[name], peak = peak_extra_memory(fn)
            peaks[name].append(peak)
    for name, values in peaks.items():
        row[f"{name}_rss_bytes"] = statistics.median(values)
        row[f"{name}_rss_runs_bytes"] = values
        row[f"{name}_tensor_bytes"] = tensor_peak_bytes(runs[name])
    # the two paths must agree (tests/test_chunked.py checks it to 1e-5; here a spot check).
    # Relative to max(1, |value|): mean_distance is in tokens (hundreds at T=2048), others 0..1
    a, b = results["full"], results["chunked"]
    row["max_rel_diff"] = max(
        float(((a[k] - b[k]).abs() / a[k].abs().clamp_min(1)).nan_to_num(0).max()) for k in a.names
    )
    return row


def growth(rows: list[dict], key: str) -> dict[str, float | None]:
    """peak(T2) / peak(T1) for consecutive lengths: when T doubles, 2.0 is linear, 4.0 quadratic.
    None where the smaller peak is under 1 MiB (an RSS reading swallowed by reused heap memory)."""
    return {
        f"{b['T']}/{a['T']}": b[key] / a[key] if a[key] >= MIB else None
        for a, b in zip(rows, rows[1:], strict=False)
    }


PATHS = {"full": "full pattern", "chunked": "query_chunk", "forward_only": "activations only"}


def plot(rows: list[dict], path: Path, query_chunk: int, n_layers: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    t = [r["T"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.8, 4.0))
    styles = {"full": ("o-", "C0"), "chunked": ("s-", "C1"), "forward_only": ("^-", "grey")}
    for name, label in PATHS.items():
        marker, color = styles[name]
        label = f"query_chunk={query_chunk}" if name == "chunked" else label
        ax.plot(t, [r[f"{name}_tensor_bytes"] / MIB for r in rows], marker, color=color,
                label=f"{label} (tensors)")  # fmt: skip
        rss = [r[f"{name}_rss_bytes"] / MIB or float("nan") for r in rows]  # log axis: no 0
        ax.plot(t, rss, marker[0] + "--", color=color, alpha=0.5, label=f"{label} (RSS)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xticks(t, [str(x) for x in t])
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
    ax.set_xlabel("prompt length T (tokens)")
    ax.set_ylabel("peak extra memory (MiB, log scale)")
    ax.set_title(f"score_heads on {n_layers} Llama-2-shaped layers (d_model 512, GQA 8/2), "
                 "batch 1", fontsize=9)  # fmt: skip
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open_atomic(path) as fh:
        fig.savefig(fh, format="png", dpi=150)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--query-chunk", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per path (median)")
    parser.add_argument("--memory-repeats", type=int, default=1, help="RSS runs per path (median)")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/bench_long.json"))
    parser.add_argument("--figure", type=Path, default=Path("experiments/figures/bench_long.png"))
    args = parser.parse_args()

    model = llama_stack(args.layers, max(2048, *args.lengths))
    rows = [
        measure(model, n, args.query_chunk, args.repeats, args.memory_repeats)
        for n in sorted(args.lengths)
    ]

    print(f"TransformerLens {'.'.join(map(str, TL_VERSION))}, {type(model).__name__}")
    print(f"{args.layers} layers, d_model 512, 8 heads (2 kv heads) of 64, batch 1, "
          f"query_chunk={args.query_chunk}, {torch.get_num_threads()} threads")  # fmt: skip
    print("peak extra memory in MiB as tensors / RSS; time in s")
    print(f"{'T':>6} {'full':>13} {'chunked':>13} {'activations':>13} "
          f"{'full s':>7} {'chunked s':>10} {'max rel diff':>12}")  # fmt: skip
    for r in rows:
        mib = [
            f"{r[f'{k}_tensor_bytes'] / MIB:.1f} / {r[f'{k}_rss_bytes'] / MIB:.1f}" for k in PATHS
        ]
        times = f"{r['full_s']:>7.2f} {r['chunked_s']:>10.2f}"
        print(f"{r['T']:>6} {mib[0]:>13} {mib[1]:>13} {mib[2]:>13} {times} "
              f"{r['max_rel_diff']:>12.1e}")  # fmt: skip
    factors = {
        measure_name: {name: growth(rows, f"{name}_{measure_name}_bytes") for name in PATHS}
        for measure_name in ("tensor", "rss")
    }
    print("growth of the peak when T doubles (2.0: linear in T, 4.0: quadratic)")
    for measure_name, by_path in factors.items():
        for name, by_step in by_path.items():
            steps = ", ".join(
                f"{k}: {'n/a' if v is None else f'{v:.2f}'}" for k, v in by_step.items()
            )
            print(f"  {measure_name:<7} {name:<13} {steps}")

    results = {
        "config": {
            "n_layers": args.layers,
            "d_model": 512,
            "n_heads": 8,
            "n_key_value_heads": 2,
            "d_head": 64,
            "d_mlp": 1376,
            "batch": 1,
            "query_chunk": args.query_chunk,
            "scores": PATTERN_SCORES,
        },
        "machine": {
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
        "rows": rows,
        "growth": factors,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(results, indent=1))
    plot(rows, args.figure, args.query_chunk, args.layers)
    print(f"wrote {args.out} and {args.figure}")


if __name__ == "__main__":
    main()
