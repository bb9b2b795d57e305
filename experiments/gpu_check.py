"""The checks that need a GPU, in one prepared script: run it where CUDA is at hand.

    python experiments/gpu_check.py --out gpu_check.json                   # on a CUDA machine
    python experiments/gpu_check.py --device cpu --layers 1 --probes-per-kind 1 --out /tmp/smoke.json
                                                  # a small CPU run of the same code paths

1. The real-size benchmark on CUDA in bfloat16: a Llama-2-7B-shaped random checkpoint (32 layers,
   12.6 GiB, written by ``bench_real_size.py``'s writer into ``--work``) loaded with
   ``load_model(device="cuda", dtype="bfloat16")``: load time, the CPU's peak resident growth (each
   layer goes to the GPU as it is converted, so this stays near one layer), the GPU's peak
   allocation; a forward pass over 320 tokens (GFLOP/s); then ``discover`` with its default
   probes and budget, each stage's time and GFLOP.
2. SmolLM2-135M (its GGUF, ``--smollm2``, default the ``real`` test tier's cache) through
   ``discover`` in float32 and in bfloat16 on the GPU: stage times, and how far the bfloat16
   scores and labels are from float32's.

Everything goes to one JSON (``--out``). Without CUDA and without ``--device cpu`` it writes
``{"skipped": ...}`` and exits 0: nothing else depends on it.
"""

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_real_size  # noqa: E402  (experiments/ on the path)


def _versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "transformer-lens")}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _memory_start(device: str) -> int:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    return bench_real_size._reset_peak()


def _memory_end(device: str, baseline: int) -> dict:
    import torch

    out = {"cpu_peak_growth_gib": (bench_real_size._peak() - baseline) / 2**30}
    if device.startswith("cuda"):
        out["gpu_peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def _discover(model, work: Path, args, **kwargs) -> tuple[dict, object]:
    from lens_attn.discover import discover

    out = Path(tempfile.mkdtemp(prefix="gpu-check-discover-", dir=work))
    start = time.perf_counter()
    run = discover(model, out, progress=False, overwrite=True, **kwargs)
    _sync(args.device)
    wall = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return {
        "wall_s": wall,
        "timings_s": dict(run.timings),
        "ablation_gflop_planned": run.plan.gflop if run.plan is not None else None,
        "labelled_heads": sum(1 for labs in run.labels.labels.values() if labs),
    }, run


def real_size(args) -> dict:
    import torch

    from lens_attn.loading import load_model

    directory = args.work / f"llama-2-7b-shaped-{args.layers}-layers"
    start = time.perf_counter()
    if not directory.exists():
        bench_real_size.write_format("safetensors", directory, args.layers, layers_per_shard=2)
    write_s = time.perf_counter() - start
    try:
        baseline = _memory_start(args.device)
        start = time.perf_counter()
        model = load_model(directory, dtype="bfloat16", device=args.device)
        _sync(args.device)
        result = {"layers": args.layers, "write_s": write_s, "load_s": time.perf_counter() - start}
        result |= _memory_end(args.device, baseline)
        n_params = sum(p.numel() for p in model.parameters())
        result["parameters"] = n_params
        tokens = torch.randint(3, 300, (1, 320), device=args.device)
        times = []
        with torch.no_grad():
            for _ in range(3):
                _sync(args.device)
                start = time.perf_counter()
                model(tokens, return_type="logits")
                _sync(args.device)
                times.append(time.perf_counter() - start)
        result["forward_320_tokens_s"] = min(times)
        result["forward_gflop_per_s"] = 2 * n_params * 320 / 1e9 / min(times)
        result["discover"], _ = _discover(model, args.work, args)
        del model
        return result
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)


def smollm2(args) -> dict:
    import torch

    from lens_attn.loading import load_model

    path = args.smollm2
    if path is None:
        sys.path.insert(0, str(HERE.parent / "tests"))
        import real_model

        path = real_model.cache_dir() / Path(real_model.SMOLLM2_MEMBER).name
    if not Path(path).is_file():
        return {"skipped": f"no SmolLM2 GGUF at {path} (pass --smollm2)"}
    out, runs = {"source": str(path)}, {}
    for dtype in ("float32", "bfloat16"):
        baseline = _memory_start(args.device)
        start = time.perf_counter()
        model = load_model(path, dtype=dtype, device=args.device, progress=False)
        _sync(args.device)
        entry = {"load_s": time.perf_counter() - start} | _memory_end(args.device, baseline)
        entry["discover"], runs[dtype] = _discover(model, args.work, args)
        out[dtype] = entry
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    f32, bf16 = runs["float32"].scores, runs["bfloat16"].scores
    out["bf16_vs_f32_max_abs_diff"] = {
        name: float((bf16.values[name] - f32.values[name]).abs().nan_to_num().max())
        for name in f32.values
    }
    labels32, labels16 = runs["float32"].labels.labels, runs["bfloat16"].labels.labels
    out["heads_with_other_labels"] = [
        f"L{layer}H{head}" for (layer, head), labs in labels32.items()
        if set(labs) != set(labels16[(layer, head)])
    ]  # fmt: skip
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON with every figure")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the 12.6 GiB checkpoint is written")  # fmt: skip
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--probes-per-kind", type=int, default=0,
                        help="cut discover's probes (0: its defaults)")  # fmt: skip
    parser.add_argument("--smollm2", type=Path, default=None, help="SmolLM2-135M GGUF")
    parser.add_argument("--skip", nargs="*", default=[], choices=("real_size", "smollm2"))
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoint")
    args = parser.parse_args(argv)

    import torch

    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        args.out.write_text(json.dumps({"skipped": "no CUDA device"}))
        print(f"no CUDA device: nothing checked; wrote {args.out}")
        return
    args.work.mkdir(parents=True, exist_ok=True)
    if args.probes_per_kind:  # cut discover's default_probes evenly, as bench_real_size does
        import lens_attn.discover as discover_module
        from lens_attn.ablation import budget
        from lens_attn.ablation.confirm import default_probes

        def few(model, *, seed: int = 0):
            return {k: budget.evenly(v, args.probes_per_kind)
                    for k, v in default_probes(model, seed=seed).items()}  # fmt: skip

        discover_module.default_probes = few
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    results = {"device": name, "versions": _versions()}
    for check, fn in (("real_size", real_size), ("smollm2", smollm2)):
        if check in args.skip:
            continue
        start = time.perf_counter()
        try:
            results[check] = fn(args)
        except Exception as err:  # record it and go on: one JSON with whatever was measured
            results[check] = {"error": f"{type(err).__name__}: {err}"}
        results[check]["check_s"] = time.perf_counter() - start
        print(check, json.dumps(results[check], indent=1), flush=True)
        args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
