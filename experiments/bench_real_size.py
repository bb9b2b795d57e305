"""Llama 2 at its real size: memory and time to load a 7B-shaped checkpoint, and discover on it.

    # the 4-layer cut (1.07e9 parameters, 2.0 GiB of bfloat16) in every format, both backends:
    python experiments/bench_real_size.py cut --work /work/wt/bigtmp --out experiments/results/real_size_cut.json
    # the full 32-layer 7B shape (6.7e9 parameters, 12.6 GiB): write, load, discover (tens of minutes)
    python experiments/bench_real_size.py full --work /work/wt/bigtmp --out experiments/results/real_size_full.json
    # or write it first (one layer of memory), then measure: full --checkpoint <the printed dir>
    python experiments/bench_real_size.py write --work /work/wt/bigtmp

A Llama-2-7B-shaped checkpoint (d_model 4096, 32 heads, d_mlp 11008, vocab 32000) with seeded random
weights is written into a temporary directory under ``--work`` one layer at a time (so writing
needs one layer of memory, not the model): Hugging Face safetensors and ``.bin`` shards, Meta's
``consolidated.NN.pth`` (two model-parallel shards), GGUF F16 and Q8_0 (``gguf.GGUFWriter``). Norm
weights are 1 + noise, so folding them changes the weights. The tokenizer is the bundled model's
(a few hundred tokens; the embedding keeps 32000 rows).

Each load is measured in a fresh subprocess: peak resident memory (``VmHWM``, reset through
``/proc/self/clear_refs`` after the imports) minus the resident memory at that point, over the
model's weight bytes in the target dtype; and the wall time of ``load_model``. transformers'
``LlamaForCausalLM.from_pretrained`` plus one forward pass over 16 tokens is measured the same way,
as the comparison. ``full`` then runs ``discover`` on the loaded model with a small budget:
``--probes-per-kind`` of each built-in probe kind (``default_probes`` cut evenly: a 7B forward
costs ~13 GFLOP a token, ~0.4 s a token on one core in bfloat16) and ``--confirm-prompts``, and
reports each stage's time and GFLOP (``2 x parameters x tokens`` for the scoring forwards; the
ablation plan's own estimate). Run it with ``OMP_NUM_THREADS=1`` and ``PYTHONPATH`` at the
repository root; the checkpoint directory is deleted at the end unless ``--keep``.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = REPO / "lens_attn" / "data" / "tiny-llama-2"
SHAPE = dict(d_model=4096, n_heads=32, d_mlp=11008, vocab=32000)  # Llama-2-7B
FORMATS = ("safetensors", "bin", "meta", "gguf-f16", "gguf-q8_0")
LAYER_TENSORS = {  # transformers name suffix -> (Meta name, Meta split dim, GGUF name)
    "input_layernorm.weight": ("attention_norm.weight", None, "attn_norm.weight"),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None, "ffn_norm.weight"),
    "self_attn.q_proj.weight": ("attention.wq.weight", 0, "attn_q.weight"),
    "self_attn.k_proj.weight": ("attention.wk.weight", 0, "attn_k.weight"),
    "self_attn.v_proj.weight": ("attention.wv.weight", 0, "attn_v.weight"),
    "self_attn.o_proj.weight": ("attention.wo.weight", 1, "attn_output.weight"),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0, "ffn_gate.weight"),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", 1, "ffn_down.weight"),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", 0, "ffn_up.weight"),
}
GLOBAL_TENSORS = {
    "model.embed_tokens.weight": ("tok_embeddings.weight", 1, "token_embd.weight"),
    "model.norm.weight": ("norm.weight", None, "output_norm.weight"),
    "lm_head.weight": ("output.weight", 0, "output.weight"),
}


# --------------------------------------------------------------------------------------------------
# the checkpoint


def shapes(n_layers: int) -> dict[str, tuple[int, ...]]:
    """transformers tensor name -> shape, in file order (embedding, layers, norm, unembedding)."""
    d, m, v = SHAPE["d_model"], SHAPE["d_mlp"], SHAPE["vocab"]
    per_layer = {
        "input_layernorm.weight": (d,),
        "post_attention_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (d, d),
        "self_attn.k_proj.weight": (d, d),
        "self_attn.v_proj.weight": (d, d),
        "self_attn.o_proj.weight": (d, d),
        "mlp.gate_proj.weight": (m, d),
        "mlp.up_proj.weight": (m, d),
        "mlp.down_proj.weight": (d, m),
    }
    out = {"model.embed_tokens.weight": (v, d)}
    for layer in range(n_layers):
        out |= {f"model.layers.{layer}.{k}": s for k, s in per_layer.items()}
    return out | {"model.norm.weight": (d,), "lm_head.weight": (v, d)}


def random_tensor(name: str, shape: tuple[int, ...]):
    """Seeded by the name, so every format holds the same weights. float32."""
    import torch

    generator = torch.Generator().manual_seed(sum(map(ord, name)) * 7919 + len(name))
    if len(shape) == 1:  # norms: 1 + noise, so folding them changes the weights
        return 1 + 0.1 * torch.randn(shape, generator=generator)
    return 0.02 * torch.randn(shape, generator=generator)


def hf_config(n_layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": SHAPE["d_model"],
        "intermediate_size": SHAPE["d_mlp"],
        "num_hidden_layers": n_layers,
        "num_attention_heads": SHAPE["n_heads"],
        "num_key_value_heads": SHAPE["n_heads"],
        "vocab_size": SHAPE["vocab"],
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "bfloat16",
    }


def _groups(n_layers: int, layers_per_shard: int) -> list[list[str]]:
    """Tensor names by shard: the embedding with the first layers, the head with the last."""
    names = list(shapes(n_layers))
    groups, current = [], []
    for name in names:
        current.append(name)
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        ends_shard = (
            layer is not None
            and name.endswith("mlp.down_proj.weight")
            and (int(layer) + 1) % layers_per_shard == 0
            and int(layer) + 1 < n_layers
        )
        if ends_shard:
            groups.append(current)
            current = []
    return groups + [current]


def _copy_tokenizer(directory: Path) -> None:
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_DIR / name, directory / name)


def write_hf(directory: Path, n_layers: int, *, kind: str, layers_per_shard: int) -> None:
    """Safetensors (``kind="safetensors"``) or ``.bin`` shards with their index, in bfloat16."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    all_shapes = shapes(n_layers)
    groups = _groups(n_layers, layers_per_shard)
    suffix = "safetensors" if kind == "safetensors" else "bin"
    stem = "model" if kind == "safetensors" else "pytorch_model"
    weight_map = {}
    for index, names in enumerate(groups, start=1):
        file = f"{stem}-{index:05d}-of-{len(groups):05d}.{suffix}"
        shard = {n: random_tensor(n, all_shapes[n]).to(torch.bfloat16) for n in names}
        if kind == "safetensors":
            save_file(shard, str(directory / file), metadata={"format": "pt"})
        else:
            torch.save(shard, directory / file)
        weight_map |= {n: file for n in names}
        del shard
    index_name = f"{stem}.{suffix}.index.json"
    (directory / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(hf_config(n_layers)))
    _copy_tokenizer(directory)


def write_meta(directory: Path, n_layers: int, *, n_shards: int = 2) -> None:
    """Meta's layout: ``params.json`` and ``n_shards`` model-parallel ``consolidated.NN.pth``."""
    import torch

    directory.mkdir(parents=True)
    all_shapes = shapes(n_layers)
    for rank in range(n_shards):
        shard = {}
        for name, shape in all_shapes.items():
            if name.startswith("model.layers."):
                layer, suffix = name.split(".", 3)[2], name.split(".", 3)[3]
                meta_name, dim, _ = LAYER_TENSORS[suffix]
                meta_name = f"layers.{layer}.{meta_name}"
            else:
                meta_name, dim, _ = GLOBAL_TENSORS[name]
            tensor = random_tensor(name, shape).to(torch.bfloat16)
            if dim is not None:
                tensor = tensor.chunk(n_shards, dim=dim)[rank].clone()
            shard[meta_name] = tensor
        torch.save(shard, directory / f"consolidated.{rank:02d}.pth")
        del shard
    params = {"dim": SHAPE["d_model"], "n_layers": n_layers, "n_heads": SHAPE["n_heads"],
              "multiple_of": 256, "norm_eps": 1e-5, "vocab_size": -1}  # fmt: skip
    (directory / "params.json").write_text(json.dumps(params))
    shutil.copy(TOKENIZER_DIR / "tokenizer.model", directory / "tokenizer.model")


def write_gguf(directory: Path, n_layers: int, *, tensor_type: str) -> None:
    """One GGUF file, 2-D weights in ``tensor_type`` (F16 or Q8_0), norms in F32, streamed: the
    tensor table first, then each tensor's data as it is generated."""
    import gguf
    import numpy as np

    directory.mkdir(parents=True)
    qtype = gguf.GGMLQuantizationType[tensor_type]
    writer = gguf.GGUFWriter(str(directory / "model.gguf"), "llama")
    writer.add_context_length(4096)
    writer.add_embedding_length(SHAPE["d_model"])
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(SHAPE["d_mlp"])
    writer.add_head_count(SHAPE["n_heads"])
    writer.add_head_count_kv(SHAPE["n_heads"])
    writer.add_rope_dimension_count(SHAPE["d_model"] // SHAPE["n_heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(SHAPE["vocab"])

    def gguf_name(name: str) -> str:
        if name.startswith("model.layers."):
            layer, suffix = name.split(".", 3)[2], name.split(".", 3)[3]
            return f"blk.{layer}.{LAYER_TENSORS[suffix][2]}"
        return GLOBAL_TENSORS[name][2]

    def encoded(name: str, shape) -> np.ndarray:
        array = random_tensor(name, shape).numpy()
        if len(shape) == 1:
            return array.astype(np.float32)
        if qtype == gguf.GGMLQuantizationType.F16:
            return array.astype(np.float16)
        return gguf.quants.quantize(array, qtype)

    all_shapes = shapes(n_layers)
    for name, shape in all_shapes.items():  # the table needs every tensor's size first
        if len(shape) == 1:
            writer.add_tensor_info(gguf_name(name), shape, np.dtype(np.float32), 4 * shape[0])
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor_info(
                gguf_name(name), shape, np.dtype(np.float16), 2 * shape[0] * shape[1]
            )
        else:
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            byte_shape = (shape[0], shape[1] // block * size)
            writer.add_tensor_info(gguf_name(name), byte_shape, np.dtype(np.uint8),
                                   byte_shape[0] * byte_shape[1], raw_dtype=qtype)  # fmt: skip
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, shape in all_shapes.items():
        writer.write_tensor_data(encoded(name, shape))
    writer.close()


def write_format(fmt: str, directory: Path, n_layers: int, *, layers_per_shard: int) -> Path:
    start = time.perf_counter()
    if fmt in ("safetensors", "bin"):
        write_hf(directory, n_layers, kind=fmt, layers_per_shard=layers_per_shard)
    elif fmt == "meta":
        write_meta(directory, n_layers)
    else:
        write_gguf(directory, n_layers, tensor_type=fmt.split("-")[1].upper())
    size = sum(f.stat().st_size for f in directory.iterdir()) / 2**30
    print(f"wrote {fmt} ({n_layers} layers, {size:.2f} GiB) in {time.perf_counter() - start:.0f} s")
    return directory


# --------------------------------------------------------------------------------------------------
# one measurement, in a fresh process


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> int:
    """Reset VmHWM to the current resident set; return that, in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def _peak() -> int:
    return _status_kib("VmHWM") * 1024


def measure(args) -> dict:
    """Load ``args.source`` (or transformers' ``from_pretrained`` + one forward) and report."""
    import torch
    import transformer_lens  # noqa: F401  (imported before the baseline)
    import transformers

    import lens_attn
    from lens_attn.loading import load_model

    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    tokenizer = None
    if args.source.endswith(".gguf") or any(Path(args.source).glob("*.gguf")):
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    baseline = _reset_peak()
    start = time.perf_counter()
    if args.backend == "transformers":
        model = transformers.LlamaForCausalLM.from_pretrained(
            args.source, dtype=dtype, attn_implementation="eager"
        )
        with torch.no_grad():
            model(torch.arange(1, 17)[None])
        n_params = sum(p.numel() for p in model.parameters())
    else:
        model = load_model(args.source, backend=args.backend, dtype=dtype, device=args.device,
                           tokenizer=tokenizer, progress=False)  # fmt: skip
        n_params = sum(p.numel() for p in model.parameters())
    seconds = time.perf_counter() - start
    peak = _peak() - baseline
    weight_bytes = n_params * torch.finfo(dtype).bits // 8
    result = {
        "source": args.source,
        "backend": args.backend,
        "dtype": args.dtype,
        "device": args.device,
        "parameters": n_params,
        "weight_gib": weight_bytes / 2**30,
        "peak_growth_gib": peak / 2**30,
        "peak_over_weights": peak / weight_bytes,
        "load_s": seconds,
        "versions": {
            "transformer_lens": _tl_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },  # fmt: skip
    }
    if args.discover:
        result["discover"] = run_discover(model, args, n_params)
        result["peak_growth_with_discover_gib"] = (_peak() - baseline) / 2**30
    del lens_attn
    return result


def _tl_version() -> str:
    from importlib.metadata import version

    return version("transformer-lens")


def run_discover(model, args, n_params: int) -> dict:
    """``discover`` with ``args.probes_per_kind`` probes of each kind; stage times and GFLOP."""
    import lens_attn.discover as discover_module
    from lens_attn.ablation import budget
    from lens_attn.ablation.confirm import default_probes

    def few_probes(model, *, seed: int = 0):
        return {k: budget.evenly(v, args.probes_per_kind)
                for k, v in default_probes(model, seed=seed).items()}  # fmt: skip

    discover_module.default_probes = few_probes  # discover's own probe choice, cut evenly
    probes = few_probes(model)
    scored = sum(len(p.tokens) for kind, ps in probes.items() if kind != "ioi" for p in ps)
    lines = []
    out = Path(tempfile.mkdtemp(prefix="discover-", dir=args.work))
    start = time.perf_counter()
    run = discover_module.discover(
        model, out, confirm_prompts=args.confirm_prompts, ablation_budget_s=args.ablation_budget_s,
        progress=True, log=lambda line: (lines.append(line), print(line, flush=True)),
        overwrite=True,
    )  # fmt: skip
    wall = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    scores_gflop = 2 * n_params * scored / 1e9
    timings = dict(run.timings)
    return {
        "wall_s": wall,
        "timings_s": timings,
        "probes": {kind: len(ps) for kind, ps in probes.items()},
        "scored_tokens": scored,
        "scores_gflop": scores_gflop,
        "scores_gflop_per_s": scores_gflop / timings["scores_s"],
        "ablation_gflop_planned": run.plan.gflop if run.plan is not None else None,
        "ablation_passes": run.plan.passes if run.plan is not None else None,
        "labelled_heads": sum(1 for labs in run.labels.labels.values() if labs),
        "log": lines,
    }


def measure_in_subprocess(source: Path, backend: str, args, *, discover: bool = False) -> dict:
    cmd = [sys.executable, __file__, "measure", "--source", str(source), "--backend", backend,
           "--dtype", args.dtype, "--device", args.device, "--work", str(args.work),
           "--probes-per-kind", str(args.probes_per_kind),
           "--confirm-prompts", str(args.confirm_prompts),
           "--ablation-budget-s", str(args.ablation_budget_s)]  # fmt: skip
    if discover:
        cmd.append("--discover")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        return {"source": str(source), "backend": backend, "error": f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# the two benchmarks


def _table(results: list[dict]) -> None:
    print(f"{'format':<12} {'backend':<13} {'weights GiB':>11} {'peak growth GiB':>15} "
          f"{'x weights':>9} {'load s':>7}")  # fmt: skip
    for r in results:
        if "error" in r:
            print(f"{r['format']:<12} {r['backend']:<13} {r['error']}")
            continue
        print(f"{r['format']:<12} {r['backend']:<13} {r['weight_gib']:>11.2f} "
              f"{r['peak_growth_gib']:>15.2f} {r['peak_over_weights']:>9.2f} {r['load_s']:>7.1f}")  # fmt: skip


def run_cut(args) -> list[dict]:
    results = []
    root = Path(tempfile.mkdtemp(prefix="real-size-cut-", dir=args.work))
    try:
        for fmt in args.formats:
            directory = write_format(
                fmt, root / fmt, args.layers, layers_per_shard=args.layers_per_shard
            )
            source = next(directory.glob("*.gguf"), directory)
            backends = list(args.backends)
            if fmt == "safetensors" and args.transformers:
                backends.append("transformers")
            for backend in backends:
                r = {"format": fmt} | measure_in_subprocess(source, backend, args)
                results.append(r)
                _table([r])
            if not args.keep:
                shutil.rmtree(directory)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return results


def run_full(args) -> list[dict]:
    root = Path(tempfile.mkdtemp(prefix="real-size-full-", dir=args.work))
    try:
        if args.checkpoint is not None:  # written earlier by ``write``
            directory = args.checkpoint
        else:
            directory = write_format("safetensors", root / "safetensors", args.layers,
                                     layers_per_shard=args.layers_per_shard)  # fmt: skip
        results = []
        for backend in args.backends:
            r = {"format": "safetensors"} | measure_in_subprocess(
                directory, backend, args, discover=True
            )
            results.append(r)
            _table([r])
            print(json.dumps(r.get("discover", {}), indent=1))
        return results
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("cut", "full", "write", "measure"),
                        help="write: only write the safetensors checkpoint into --work")  # fmt: skip
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the checkpoints are written (needs 13 GiB free for full)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="results JSON")
    parser.add_argument("--layers", type=int, default=None, help="default: 4 (cut), 32 (full)")
    parser.add_argument("--layers-per-shard", type=int, default=2)
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--backends", nargs="+", default=None,
                        help="hooked and/or bridge (default: what the installed TransformerLens has)")  # fmt: skip
    parser.add_argument("--no-transformers", dest="transformers", action="store_false",
                        help="skip the from_pretrained comparison")  # fmt: skip
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--probes-per-kind", type=int, default=4)
    parser.add_argument("--confirm-prompts", type=int, default=8)
    parser.add_argument("--ablation-budget-s", type=float, default=300)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="(full) a checkpoint already written by `write`; kept")  # fmt: skip
    parser.add_argument("--source", help="(measure) the checkpoint to load")
    parser.add_argument("--backend", help="(measure) hooked, bridge or transformers")
    parser.add_argument("--discover", action="store_true", help="(measure) run discover too")
    args = parser.parse_args(argv)
    if args.mode == "measure":
        print(json.dumps(measure(args)))
        return
    if args.backends is None:
        from lens_attn.compat import HAS_HOOKED

        args.backends = ["hooked", "bridge"] if HAS_HOOKED else ["bridge"]
    args.layers = args.layers or (4 if args.mode == "cut" else 32)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.mode == "write":
        directory = args.work / f"llama-2-7b-shaped-{args.layers}-layers"
        write_format("safetensors", directory, args.layers, layers_per_shard=args.layers_per_shard)
        print(f"wrote {directory}")
        return
    results = run_cut(args) if args.mode == "cut" else run_full(args)
    print()
    _table(results)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
