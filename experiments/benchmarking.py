"""Small measuring tools shared by the benchmark scripts in ``experiments/`` and the memory tests.

Absolute timings on shared machines are noisy, so benchmarks report *ratios* of two things measured
side by side in one run (``interleaved_times``, ``best_times``). Peak memory on the CPU is the
process's peak resident set size, reset before the measured call (Linux ``/proc/self/clear_refs``); on CUDA it is
``torch.cuda.max_memory_allocated``.
"""

import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}; peak memory needs Linux")


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def _mallopt(param: int, value: int) -> None:
    """glibc's ``mallopt``; nothing where there is no glibc."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(param, value)
    except (OSError, AttributeError):
        pass


def _fix_malloc_mmap_threshold() -> None:
    """Make glibc serve every block over 128 KiB with mmap and give it back on free, so that the
    resident set follows the live tensors (glibc otherwise raises the threshold as blocks are freed)."""
    _mallopt(M_MMAP_THRESHOLD, 128 * 1024)


def steady_malloc() -> None:
    """The opposite, for timings: glibc keeps freed memory in the process (no ``mmap`` per large
    tensor, no trimming), so page faults from its changing thresholds stop disturbing them."""
    _mallopt(M_MMAP_THRESHOLD, 1 << 30)
    _mallopt(M_TRIM_THRESHOLD, 1 << 31)


def peak_extra_memory(fn: Callable[[], object], *, device: str = "cpu") -> tuple[object, int]:
    """Run ``fn()`` and return ``(result, bytes)``: its peak memory above what was in use before."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - before
    _fix_malloc_mmap_threshold()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    before = _rss_kib("VmRSS")
    result = fn()
    return result, max(0, _rss_kib("VmHWM") - before) * 1024


def interleaved_times(
    fns: dict[str, Callable[[], object]], *, repeats: int = 5
) -> dict[str, float]:
    """Median seconds of each function, run in turn ``repeats`` times (after one warm-up each)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def best_times(
    fns: dict[str, Callable[[], object]],
    *,
    repeats: int = 5,
    min_seconds: float = 0.0,
    max_rounds: int = 100,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Best (minimum) seconds of each function over interleaved rounds, after one warm-up each: at
    least ``repeats`` rounds, and more (up to ``max_rounds``) until the rounds took ``min_seconds``
    (wall time), so that fast functions get enough rounds for the minimum to find a quiet moment of
    a shared machine. ``clock`` times each call (``time.process_time``: this process's CPU time,
    steadier than wall time on a loaded machine when torch runs one thread)."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    start_all, rounds = time.perf_counter(), 0
    while rounds < max_rounds and (
        rounds < repeats or time.perf_counter() - start_all < min_seconds
    ):
        for name, fn in fns.items():
            start = clock()
            fn()
            best[name] = min(best[name], clock() - start)
        rounds += 1
    return best


# ------------------------------------------------------------------------------ streaming memory probe
# Peak RSS is only trustworthy in a fresh process whose allocator was set up before torch allocated
# anything (freed heap memory is otherwise reused without showing in RSS), so the memory-vs-depth
# comparison runs each configuration in its own subprocess: ``python -m benchmarking``.


def llama_shaped(
    n_layers: int,
    *,
    d_model: int = 64,
    n_heads: int = 8,
    n_key_value_heads: int = 2,
    d_mlp: int = 96,
    d_vocab: int = 50,
    n_ctx: int = 256,
    tokenizer=None,
):
    """A random-init Llama-shaped ``HookedTransformer`` (RMSNorm, rotary, SwiGLU, GQA, no biases).

    The defaults are the small stack of the memory-vs-depth probe; the benchmarks in
    ``experiments/`` ask for wider ones. With a ``tokenizer``, ``d_vocab`` is its size. On
    TransformerLens 4 (no ``HookedTransformer``) the same shapes as a ``TransformerBridge`` around a
    random transformers ``LlamaForCausalLM``.
    """
    from lens_attn.compat import HAS_HOOKED, HookedTransformer, HookedTransformerConfig

    if not HAS_HOOKED:
        return _llama_shaped_bridge(
            n_layers, d_model=d_model, n_heads=n_heads, n_key_value_heads=n_key_value_heads,
            d_mlp=d_mlp, d_vocab=len(tokenizer) if tokenizer is not None else d_vocab,
            n_ctx=n_ctx, tokenizer=tokenizer,
        )  # fmt: skip
    d_head = d_model // n_heads
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_head,
        n_key_value_heads=n_key_value_heads,
        d_mlp=d_mlp,
        d_vocab=len(tokenizer) if tokenizer is not None else d_vocab,
        n_ctx=n_ctx,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        gated_mlp=True,
        final_rms=True,
        default_prepend_bos=True,
        seed=0,
    )
    return HookedTransformer(cfg, tokenizer=tokenizer).eval()


def _llama_shaped_bridge(
    n_layers, *, d_model, n_heads, n_key_value_heads, d_mlp, d_vocab, n_ctx, tokenizer
):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lens_attn.loading import BUNDLED_CHECKPOINT, LoadOptions, bridge_from_hf
    from lens_attn.loading.hf import _WITH_BOS

    config = LlamaConfig(
        hidden_size=d_model, num_attention_heads=n_heads, num_key_value_heads=n_key_value_heads,
        intermediate_size=d_mlp, num_hidden_layers=n_layers, vocab_size=d_vocab,
        max_position_embeddings=n_ctx, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    hf_model = LlamaForCausalLM(config).eval().requires_grad_(False)
    if tokenizer is None:  # the bridge needs one; the bundled checkpoint's, read from disk
        tokenizer = AutoTokenizer.from_pretrained(BUNDLED_CHECKPOINT, **_WITH_BOS)
    options = LoadOptions(
        backend="bridge", device=torch.device("cpu"), dtype=torch.float32, n_devices=1,
        fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True,
        tokenizer=tokenizer,
    )  # fmt: skip
    return bridge_from_hf(
        hf_model, tokenizer, model_name="llama-shaped", options=options, extras={}
    )


def scoring_peak_memory(
    n_layers: int, *, mode: str = "scores", n_pos: int = 256, batch: int = 8
) -> int:
    """Peak extra bytes of scoring (``mode="scores"``) or of caching every pattern (``"cache"``)."""
    import warnings

    from lens_attn.scoring.builtin import BUILTIN_SCORES
    from lens_attn.scoring.registry import registered
    from lens_attn.scoring.runner import score_heads

    warnings.filterwarnings("ignore")
    model = llama_shaped(n_layers, n_ctx=n_pos)
    tokens = torch.randint(3, 50, (batch, n_pos), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 1
    names = [s for s in BUILTIN_SCORES if registered()[s].hooks]  # the pattern scores
    if mode not in ("scores", "cache"):
        raise ValueError(f"unknown mode {mode!r}; valid: scores, cache")

    def run():
        if mode == "scores":
            return score_heads(model, tokens, scores=names, batch_size=batch, progress=False)
        return model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))

    run()  # warm-up: first-call allocations are not the measured pass's
    return peak_extra_memory(run)[1]


def scoring_peak_memory_in_subprocess(
    n_layers: int, *, mode: str = "scores", timeout: float = 600
) -> int:
    """``scoring_peak_memory`` in a fresh Python process (see the comment above)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, __file__, "--layers", str(n_layers), "--mode", mode],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    return int(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    import argparse

    _fix_malloc_mmap_threshold()  # before torch allocates
    parser = argparse.ArgumentParser(description="print the peak extra bytes of one scoring pass")
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--mode", choices=("scores", "cache"), default="scores")
    args = parser.parse_args()
    print(scoring_peak_memory(args.layers, mode=args.mode))
