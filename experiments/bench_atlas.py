"""The atlas pass against a plain forward over the same tokens, and its peak memory vs corpus size.

    PYTHONPATH=. OMP_NUM_THREADS=1 python experiments/bench_atlas.py speed --model bundled
    PYTHONPATH=. OMP_NUM_THREADS=1 python experiments/bench_atlas.py speed --model smollm2 --texts 12
    PYTHONPATH=. OMP_NUM_THREADS=1 python experiments/bench_atlas.py memory --scale 1   # fresh process
    PYTHONPATH=. OMP_NUM_THREADS=1 python experiments/bench_atlas.py memory --scale 10  # each

``speed``: one torch thread; the batches the atlas streams (``lens_attn.atlases.runner``) are built
once, then four things run interleaved, best of ``--repeats`` in wall time and in CPU time of this
process (the shared machine's other processes slow the wall clock of whichever runs beside them): the atlas pass (tokenizing, windowing,
every hook's reductions; ``_stream``), a plain forward ``model(tokens)`` of the same batches (logits
included), and a plain forward stopped after the last block (``stop_at_layer``, as the atlas pass
stops), and that forward with the atlas's hooks doing nothing. Prints the ratios.

``memory``: the whole ``lens_attn.atlas`` (pass, circuits, PCA, probes) on the default corpus
repeated ``--scale`` times (a lazily generated corpus, so the texts are not all held), and the
process's peak RSS (``ru_maxrss``). Compare ``--scale 1`` and ``--scale 10`` run as separate processes.
"""

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch
from transformer_lens.utilities import get_act_name

import lens_attn
from lens_attn.atlases import runner
from lens_attn.atlases.corpus import default_corpus, iter_windows
from lens_attn.atlases.reduce import AtlasState, ReduceConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from benchmarking import steady_malloc  # noqa: E402


def load(name: str):
    if name == "bundled":
        return lens_attn.load_model(device="cpu")
    import real_model

    return lens_attn.load_model(real_model.smollm2_gguf(), device="cpu")


def best_times_with_cpu(fns, *, repeats: int):
    """Best wall, CPU (``time.process_time``: this process only, so other processes on a shared
    machine disturb it less) and user-mode CPU seconds of each function, interleaved, after a
    warm-up; and the minor page faults of the round with the best CPU time."""
    for fn in fns.values():
        fn()
    wall = {name: float("inf") for name in fns}
    cpu, user, faults = dict(wall), dict(wall), dict.fromkeys(fns, 0)
    for _ in range(repeats):
        for name, fn in fns.items():
            usage = resource.getrusage(resource.RUSAGE_SELF)
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name] = min(wall[name], time.perf_counter() - start)
            seconds = time.process_time() - start_cpu
            after = resource.getrusage(resource.RUSAGE_SELF)
            user[name] = min(user[name], after.ru_utime - usage.ru_utime)
            if seconds < cpu[name]:
                cpu[name], faults[name] = seconds, after.ru_minflt - usage.ru_minflt
    return wall, cpu, user, faults


def speed(args) -> None:

    model = load(args.model)
    texts = default_corpus()[:: max(1, 128 // args.texts)][: args.texts]  # a mix of its kinds
    window = min(args.window, model.cfg.n_ctx)
    config = ReduceConfig(k=20, n_keys=5, before=24, after=6, sample_size=150)
    windows = list(iter_windows(model, texts, window))
    batches = [
        runner._positions(model, chunk, 0)[0]
        for buffer in runner._buffers(windows, args.batch_size, None)
        for chunk in buffer
    ]
    n_tokens = sum(len(w.tokens) for w in windows)
    stop = {"stop_at_layer": model.cfg.n_layers}

    def atlas_pass():
        state = AtlasState(model.cfg.n_layers, model.cfg.n_heads, config)
        runner._stream(model, texts, window, args.batch_size, state, config, 0, None, False)

    @torch.no_grad()
    def plain():
        for tokens in batches:
            model(tokens)

    @torch.no_grad()
    def plain_blocks():
        for tokens in batches:
            model(tokens, return_type=None, **stop)

    last = get_act_name("z", model.cfg.n_layers - 1)

    def nothing(activation, hook):
        if hook.name == last:
            raise lens_attn.compat.StopForward  # as the atlas pass stops

    hooks = [(name, nothing) for layer in range(model.cfg.n_layers)
             for name in (get_act_name("pattern", layer), get_act_name("z", layer))]  # fmt: skip

    @torch.no_grad()
    def noop_hooks():
        with model.hooks(fwd_hooks=hooks):  # attached once, as the atlas pass does
            for tokens in batches:
                lens_attn.compat.run_until_stopped(model, tokens)

    fns = {"atlas pass": atlas_pass, "plain forward": plain, "forward to last block": plain_blocks,
           "same hooks, doing nothing": noop_hooks}  # fmt: skip
    best, cpu, user, faults = best_times_with_cpu(fns, repeats=args.repeats)
    version = lens_attn.compat.TL_VERSION
    print(f"{args.model} ({type(model).__name__}, TransformerLens {'.'.join(map(str, version))}), "
          f"{len(texts)} texts, {n_tokens} tokens, {len(batches)} batches of <= {args.batch_size}, "
          f"window {window}, 1 thread, best of {args.repeats}, "
          f"{'steady' if args.steady_malloc else 'default'} malloc, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"  {'':26s} {'wall s':>8s} {'cpu s':>8s} {'user s':>8s} {'faults':>8s} {'tokens/s':>9s}")
    for name in fns:
        print(f"  {name:26s} {best[name]:8.3f} {cpu[name]:8.3f} {user[name]:8.3f} "
              f"{faults[name]:8d} {n_tokens / cpu[name]:9.0f}")  # fmt: skip
    for base in ("plain forward", "forward to last block", "same hooks, doing nothing"):
        print(f"  atlas / {base:26s} wall {best['atlas pass'] / best[base]:.3f}   "
              f"cpu {cpu['atlas pass'] / cpu[base]:.3f}   "
              f"user {user['atlas pass'] / user[base]:.3f}")  # fmt: skip


class _Repeated:
    """The default corpus ``scale`` times over, generated lazily (never held whole)."""

    def __init__(self, scale: int):
        self.scale = scale

    def __iter__(self):
        for _ in range(self.scale):
            yield from default_corpus()


def memory(args) -> None:
    model = load(args.model)
    start = time.perf_counter()
    head_atlas = lens_attn.atlas(model, _Repeated(args.scale), progress=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.model}, default corpus x{args.scale}: {head_atlas.provenance['n_tokens']} tokens "
          f"in {seconds:.1f} s, peak RSS {peak:.0f} MiB")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("speed", "memory"))
    parser.add_argument("--model", choices=("bundled", "smollm2"), default="bundled")
    parser.add_argument(
        "--texts", type=int, default=128, help="speed: texts of the default corpus (every one: 128)"
    )
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", type=int, default=1, help="memory: corpus repeats")
    parser.add_argument(
        "--steady-malloc",
        action="store_true",
        help="speed: glibc keeps freed memory (no page faults from its thresholds)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.steady_malloc:
        steady_malloc()
    speed(args) if args.what == "speed" else memory(args)


if __name__ == "__main__":
    main()
