"""A model split over several GPUs (``load_model(..., n_devices=k)``), tested as far as a CPU can.

Without GPUs, three things are checked: the block -> device mapping (TransformerLens's
``get_device_for_block_index``, which ``HookedTransformer.forward`` follows) for several sizes; that
``split_across_devices`` puts every module where that mapping says; and that the forward, the
chunked forward and every pattern score cope with layers living on *different* devices. For the
last, the "second GPU" is PyTorch's ``meta`` device: tensors there have shapes but no data, and any
operation mixing a ``meta`` and a CPU tensor raises, so a mask left on the first layer's device
fails loudly. The real multi-GPU test runs only where two CUDA devices exist.
"""

import importlib

import pytest
import torch
from transformer_lens.utilities import get_act_name, multi_gpu

from lens_attn.ablation.sweep import ablation_sweep
from lens_attn.compat import HookedTransformer, HookedTransformerConfig
from lens_attn.loading import devices, layer_devices, load_model, split_across_devices
from lens_attn.probes import Probe, pad
from lens_attn.scoring import chunked
from lens_attn.scoring.builtin import BUILTIN_SCORES
from lens_attn.scoring.protocol import Batch, DetectionPattern
from lens_attn.scoring.registry import registered
from lens_attn.scoring.runner import score_heads

CUDA = torch.device("cuda", 0)
SIMULATED = {0: torch.device("cpu"), 1: torch.device("meta")}  # GPU index -> stand-in device


def _config(n_layers: int, *, device: str = "cpu", n_devices: int = 1) -> HookedTransformerConfig:
    """A tiny Llama-like config; device/n_devices are set after construction, because the config
    itself refuses ``n_devices`` larger than the visible CUDA devices."""
    cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=24, n_ctx=32, d_head=4, n_heads=6, n_key_value_heads=2,
        d_mlp=36, d_vocab=50, act_fn="silu", normalization_type="RMS",
        positional_embedding_type="rotary", rotary_dim=4, gated_mlp=True, seed=0,
    )  # fmt: skip
    cfg.device, cfg.n_devices = device, n_devices
    return cfg


# --------------------------------------------------------------------------------- the mapping


@pytest.mark.hooked_only
@pytest.mark.parametrize(
    ("n_layers", "n_devices", "device", "expected"),
    [
        (3, 2, "cuda", [0, 0, 1]),
        (4, 2, "cuda", [0, 0, 1, 1]),
        (3, 3, "cuda", [0, 1, 2]),
        (2, 4, "cuda", [0, 2]),  # more GPUs than layers: some stay empty
        (5, 2, "cuda:2", [2, 2, 2, 3, 3]),  # starts at the configured GPU
    ],
    ids=["3-on-2", "4-on-2", "3-on-3", "2-on-4", "5-on-2-from-2"],
)
def test_layer_devices(n_layers, n_devices, device, expected):
    cfg = _config(n_layers, device=device, n_devices=n_devices)
    assert layer_devices(cfg) == [torch.device("cuda", i) for i in expected]


@pytest.mark.hooked_only
@pytest.mark.parametrize(("n_layers", "n_devices"), [(32, 4), (40, 3), (80, 8), (80, 3)])
def test_llama_sizes_split_into_contiguous_near_equal_runs(n_layers, n_devices):
    devices = [
        d.index for d in layer_devices(_config(n_layers, device="cuda", n_devices=n_devices))
    ]
    assert devices == sorted(devices)  # contiguous runs: the residual stream moves forward only
    counts = [devices.count(i) for i in range(n_devices)]
    assert max(counts) - min(counts) <= 1 and sum(counts) == n_layers


@pytest.mark.hooked_only
def test_cpu_config_keeps_every_block_on_the_cpu():
    assert layer_devices(_config(3)) == [torch.device("cpu")] * 3


# ---------------------------------------------------------------------- a simulated split model


def _simulated(index: int, cfg, device=None) -> torch.device:
    """TransformerLens's mapping for GPUs from ``cuda:0``, with GPU 0 played by the CPU (also the
    model's ``cfg.device``, where inputs go) and GPU 1 by ``meta``."""
    return SIMULATED[multi_gpu.get_device_for_block_index(index, cfg, "cuda:0").index]


@pytest.fixture
def split_model(monkeypatch) -> HookedTransformer:
    """A 3-layer model "split over 2 GPUs": blocks 0-1 (and the embedding) on the CPU, block 2,
    ln_final and the unembedding on ``meta``. Both the placement and ``HookedTransformer.forward``
    use the simulated mapping."""
    ht_module = importlib.import_module("transformer_lens.HookedTransformer")
    monkeypatch.setattr(ht_module, "get_device_for_block_index", _simulated)
    monkeypatch.setattr(devices, "get_device_for_block_index", _simulated)
    model = HookedTransformer(_config(3), move_to_device=False)
    model.cfg.n_devices = 2  # cfg.device stays "cpu": the first "GPU"
    return split_across_devices(model).eval()


def _device(module) -> str:
    return next(module.parameters()).device.type


@pytest.mark.hooked_only
def test_split_places_every_module_on_its_blocks_device(split_model):
    assert _device(split_model.embed) == "cpu"
    assert [_device(block) for block in split_model.blocks] == ["cpu", "cpu", "meta"]
    # after the last block the residual stream is on the last block's device: so are these
    assert _device(split_model.ln_final) == "meta" and _device(split_model.unembed) == "meta"
    # rotary tables and masks are buffers of the blocks: they moved with them
    assert split_model.blocks[2].attn.rotary_sin.device.type == "meta"


@pytest.mark.hooked_only
def test_one_device_is_transformer_lens_placement_unchanged():
    model = HookedTransformer(_config(3), move_to_device=False)
    placed = split_across_devices(model)
    assert placed is model
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def _record_devices(seen: dict):
    def hook(act, hook):
        seen[hook.layer()] = act.device.type

    return hook


@pytest.mark.hooked_only
def test_forward_moves_the_residual_stream_between_devices(split_model):
    seen: dict[int, str] = {}
    tokens = torch.randint(3, 50, (2, 7))
    hooks = [(get_act_name("pattern", layer), _record_devices(seen)) for layer in range(3)]
    logits = split_model.run_with_hooks(tokens, fwd_hooks=hooks)
    assert seen == {0: "cpu", 1: "cpu", 2: "meta"}
    assert logits.device.type == "meta" and logits.shape == (2, 7, 50)


def _batch(model) -> Batch:
    probes = [
        Probe("prompt", torch.tensor([1, 5, 6, 7, 5, 6, 7])),
        Probe("prompt", torch.tensor([1, 8, 9, 8])),
    ]
    tokens, mask = pad(probes)
    return Batch(tokens, mask, probes, model)  # on the first device (the CPU), like score_heads's


# DominantOffset ("offset") indexes with a boolean mask (nonzero), which the meta device cannot
# run (unknown output size); read instead: every tensor it builds is created on ``p.device``.
ON_META = [  # pattern-only scores (name_mover also reads hook_z)
    name for name in BUILTIN_SCORES if registered()[name].hooks == ("pattern",) and name != "offset"
]


@pytest.mark.hooked_only
@pytest.mark.parametrize("name", ON_META)
def test_scores_reduce_patterns_on_another_device(split_model, name):
    # a pattern of a layer on the "second GPU", with the batch's tokens and masks on the first
    batch = _batch(split_model)
    pattern = torch.rand(2, 6, 7, 7, device="meta")  # [batch, head_index, query_pos, key_pos]
    state = registered()[name].reduce(2, {"pattern": pattern}, batch)
    assert {v.device.type for v in state.values()} == {"meta"}


@pytest.mark.hooked_only
def test_detection_patterns_on_another_device(split_model):
    analysis = DetectionPattern("prev", lambda t: torch.diag(torch.ones(len(t) - 1), -1))
    pattern = torch.rand(2, 6, 7, 7, device="meta")
    state = analysis.reduce(2, {"pattern": pattern}, _batch(split_model))
    assert {v.device.type for v in state.values()} == {"meta"}


@pytest.mark.hooked_only
def test_chunked_scoring_on_a_split_model(split_model):
    # the chunked forward with a padding mask made on the first device, scores reduced per block
    batch = _batch(split_model)
    chunkable = [registered()[name] for name in ON_META if registered()[name].chunkable]
    seen: dict[int, set] = {}

    def on_blocks(layer, blocks):
        for start, block in blocks:
            batch.query_start = start
            seen.setdefault(layer, set()).add(block.device.type)
            for analysis in chunkable:
                state = analysis.reduce(layer, {"pattern": block}, batch)
                assert {v.device.type for v in state.values()} == {block.device.type}
        batch.query_start = 0

    with chunked.chunked_attention(split_model, 3, on_blocks):
        logits = split_model(batch.tokens, attention_mask=batch.mask.long(), return_type="logits")
    assert seen == {0: {"cpu"}, 1: {"cpu"}, 2: {"meta"}}
    assert logits.device.type == "meta"


@pytest.mark.hooked_only
@pytest.mark.parametrize("method", ["zero", "bos", "uniform"])
def test_ablation_hooks_on_a_split_model(split_model, method):
    # the hooks build their replacement on the activation's own device (masks moved to it)
    from lens_attn.ablation.methods import ablate

    tokens = torch.randint(3, 50, (2, 7))
    with ablate(split_model, [(2, 1), (0, 3)], method=method):
        logits = split_model(tokens, return_type="logits")
    assert logits.device.type == "meta" and logits.shape == (2, 7, 50)


# ----------------------------------------------------------------------------- load_model checks


def _pretend_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_n_devices_needs_cuda(tiny_checkpoints):
    with pytest.raises(ValueError, match=r"n_devices=2 needs device='cuda', got 'cpu'"):
        load_model(tiny_checkpoints["gqa"].path, device="cpu", n_devices=2)


@pytest.mark.parametrize(
    ("device", "n_devices", "message"),
    [("cuda", 3, r"needs GPUs 0\.\.2 but only 2"), ("cuda:1", 2, r"needs GPUs 1\.\.2 but only 2")],
)
def test_n_devices_beyond_the_visible_gpus_refused(
    monkeypatch, tiny_checkpoints, device, n_devices, message
):
    _pretend_gpus(monkeypatch, 2)  # refused before anything is loaded or moved
    with pytest.raises(ValueError, match=message):
        load_model(tiny_checkpoints["gqa"].path, device=device, n_devices=n_devices)


@pytest.mark.parametrize("bad", [0, -1, True])
def test_n_devices_must_be_a_positive_integer(tiny_checkpoints, bad):
    with pytest.raises(ValueError, match="n_devices must be a positive integer"):
        load_model(tiny_checkpoints["gqa"].path, device="cpu", n_devices=bad)


def test_bridge_uses_accelerate_balanced_device_map(monkeypatch):
    _pretend_gpus(monkeypatch, 2)
    monkeypatch.setattr(multi_gpu, "_get_available_cuda_memory_for_device", lambda i: 10 * 2**30)
    assert devices.bridge_device_map("bridge", 2) == ("balanced", {0: 10 * 2**30, 1: 10 * 2**30})
    assert devices.bridge_device_map("hooked", 2) == (None, None)
    assert devices.bridge_device_map("bridge", 1) == (None, None)


# ------------------------------------------------------------------------------- real GPUs


@pytest.mark.hooked_only
@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason=f"needs 2 CUDA GPUs to split layers; this machine has {torch.cuda.device_count()} "
    "(the mapping and placement are tested above on the CPU)",
)
def test_split_over_two_gpus_matches_the_cpu(tiny_checkpoints):
    path = tiny_checkpoints["gqa"].path
    reference = load_model(path, device="cpu")
    split = load_model(path, device="cuda", n_devices=2)
    devices = layer_devices(split.cfg)
    assert len(set(devices)) == 2
    assert [next(b.parameters()).device for b in split.blocks] == devices
    assert next(split.unembed.parameters()).device == devices[-1]
    tokens = torch.randint(3, split.cfg.d_vocab, (2, 20))
    torch.testing.assert_close(
        split(tokens, return_type="logits").cpu(), reference(tokens, return_type="logits"),
        atol=1e-4, rtol=1e-4,  # GPU and CPU float32 kernels sum in different orders
    )  # fmt: skip
    prompts = ["the cat sat on the mat and the cat sat on the mat", "one two three one two three"]
    for method in ("zero", "mean", "resample"):  # mean/resample keep reference activations
        kwargs = dict(method=method, metric="loss", heads=["L0H1", "L2H3", "L2"], reference=prompts)
        on_cpu = ablation_sweep(reference, prompts, **kwargs).ablated
        torch.testing.assert_close(ablation_sweep(split, prompts, **kwargs).ablated, on_cpu,
                                   atol=1e-4, rtol=1e-4)  # fmt: skip
    cpu_scores = score_heads(reference, prompts, progress=False)
    for query_chunk in (None, 4):
        gpu_scores = score_heads(split, prompts, query_chunk=query_chunk, progress=False)
        for name in cpu_scores.names:
            torch.testing.assert_close(
                gpu_scores[name], cpu_scores[name], atol=1e-4, rtol=1e-4, equal_nan=True
            )
