"""Streamed loading (``lens_attn.loading.stream``) against TransformerLens's own whole-model route.

The reference for every comparison is plain TransformerLens on a transformers model read by
``from_pretrained``: ``convert_llama_weights`` + ``HookedTransformer.load_and_process_state_dict``
for the hooked backend, ``TransformerBridge.boot_transformers`` + ``enable_compatibility_mode()``
for the bridge. The streamed model must have the same processed weights (hooked) or the same
activations (bridge), to float32 round-off; in bfloat16, to one rounding of the weights. Also:
every format's reader returns the checkpoint's tensors, each layer's weights are placed on their
device as they are assigned (the meta device standing in for a second GPU), and progress reports.
"""

import warnings

import pytest
import torch
from checkpoints import BACKENDS, load_reference, write_hf_checkpoint, write_meta_checkpoint
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.utilities import get_act_name
from transformers import AutoTokenizer

from lens_attn import progress
from lens_attn.compat import HookedTransformer
from lens_attn.loading import devices, hooked_config_from_hf, load_model, stream
from lens_attn.loading.convert import LoadOptions
from lens_attn.loading.hf import open_llama_directory

TOKENS = torch.tensor([[1, 17, 250, 3, 99, 42, 7, 300, 5, 64, 12, 180]])


def _reference_hooked(path, dtype):
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

    hf = load_reference(path).to(dtype)
    cfg = hooked_config_from_hf(hf.config, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg, move_to_device=False)
    model.load_and_process_state_dict(convert_llama_weights(hf, cfg))
    return model


@pytest.mark.hooked_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_hooked_weights_match_transformer_lens_processing(hf_checkpoint, dtype):
    ours = load_model(hf_checkpoint.path, backend="hooked", device="cpu", dtype=dtype)
    theirs = _reference_hooked(hf_checkpoint.path, dtype)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert set(ours_sd) == set(theirs_sd)
    for name, expected in theirs_sd.items():
        got = ours_sd[name]
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        if not expected.is_floating_point() or not expected.numel() or "IGNORE" in name:
            assert torch.equal(got, expected), name  # masks, -inf fill values
        elif dtype == torch.float32:  # the same products and means, summed in another order
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6, msg=name)
        else:
            # TransformerLens 3.9 folds in bfloat16 and we in float32, each rounding once or
            # twice: at most 2 units in the last place (2 x 2^-8 relative) apart.
            scale = expected.float().abs().amax().clamp_min(1e-30)
            diff = (got.float() - expected.float()).abs().amax()
            assert diff <= 2 * 2**-8 * scale, (name, diff, scale)


def _reference_bridge(path, dtype):
    hf = load_reference(path).to(dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    bridge = TransformerBridge.boot_transformers(
        str(path), hf_model=hf, tokenizer=tokenizer, dtype=dtype, device="cpu"
    )
    bridge.enable_compatibility_mode(disable_warnings=True)
    return bridge


def _activations(model, names):
    with torch.no_grad():
        logits, cache = model.run_with_cache(TOKENS, names_filter=names)
    return {name: cache[name].float() for name in names} | {"logp": logits.float().log_softmax(-1)}


def test_bridge_activations_match_transformer_lens_processing(hf_checkpoint):
    """float32: the same activations as TransformerLens's processing, to round-off. bfloat16: the
    two differ (TransformerLens's processed bridge runs other ops, rounded elsewhere), so each is
    compared with the float32 reference: ours may be no farther from it than 1.5x TransformerLens's
    own bfloat16 model is, plus one bfloat16 unit of the activation's scale."""
    path = hf_checkpoint.path
    n_layers = hf_checkpoint.hf_model.config.num_hidden_layers
    names = [get_act_name(kind, layer) for layer in range(n_layers)
             for kind in ("pattern", "q", "z", "resid_post")]  # fmt: skip
    ours = _activations(load_model(path, backend="bridge", device="cpu"), names)
    truth = _activations(_reference_bridge(path, torch.float32), names)
    for name, expected in truth.items():
        torch.testing.assert_close(ours[name], expected, atol=1e-5, rtol=1e-5, msg=name)

    ours_bf16 = load_model(path, backend="bridge", device="cpu", dtype=torch.bfloat16)
    assert ours_bf16.cfg.normalization_type == "RMSPre" or ours_bf16.cfg.normalization_type == (
        _reference_bridge(path, torch.bfloat16).cfg.normalization_type
    )
    ours_bf16 = _activations(ours_bf16, names)
    theirs_bf16 = _activations(_reference_bridge(path, torch.bfloat16), names)
    for name, expected in truth.items():
        ours_err = (ours_bf16[name] - expected).abs().max()
        theirs_err = (theirs_bf16[name] - expected).abs().max()
        ulp = 2**-8 * expected.abs().max()
        assert ours_err <= 1.5 * theirs_err + ulp, (name, ours_err, theirs_err)


# ---- readers: every format returns the checkpoint's own tensors ---------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "bin", "meta"])
def test_readers_return_the_checkpoint_tensors(tmp_path, tiny_tokenizer_dir, fmt):
    from checkpoints import tiny_llama_config

    config = tiny_llama_config("gqa")
    if fmt == "meta":
        source = write_hf_checkpoint(
            tmp_path / "hf", config, seed=3, tokenizer_dir=tiny_tokenizer_dir
        )
        directory = write_meta_checkpoint(
            tmp_path / "meta", source, n_shards=2, tokenizer_dir=tiny_tokenizer_dir
        )
    else:
        directory = tmp_path / fmt
        source = write_hf_checkpoint(
            directory, config, seed=3, tokenizer_dir=tiny_tokenizer_dir, fmt=fmt
        )
    expected = source.state_dict()
    reader, _ = open_llama_directory(directory)
    with reader:
        for _ in range(2):  # twice: pages released after the first read are read back
            for name, tensor in expected.items():
                torch.testing.assert_close(
                    reader.read(name, torch.float32), tensor, rtol=0, atol=0, msg=name
                )
        got = reader.read("model.norm.weight", torch.bfloat16)
        assert got.dtype == torch.bfloat16 and got.is_contiguous()


# ---- placement: each layer goes to its device as it is assigned ---------------------------------


def _record_assignments(monkeypatch) -> list[tuple[list[str], torch.device]]:
    calls = []
    assign = stream.assign_parameters

    def recording(model, state, device):
        calls.append((list(state), torch.device(device)))
        return assign(model, state, device)

    monkeypatch.setattr(stream, "assign_parameters", recording)
    return calls


@pytest.mark.hooked_only
def test_hooked_layers_are_placed_as_they_are_converted(monkeypatch, tiny_checkpoints):
    """Two "GPUs": GPU 0 played by the CPU, GPU 1 by ``meta`` (as in test_multi_device.py)."""
    from test_multi_device import _simulated

    monkeypatch.setattr(devices, "get_device_for_block_index", _simulated)
    calls = _record_assignments(monkeypatch)
    reader, tokenizer = open_llama_directory(tiny_checkpoints["gqa"].path)
    options = LoadOptions(
        backend="hooked", device=torch.device("cpu"), dtype=torch.float32, n_devices=2,
        fold_ln=True, center_writing_weights=True, center_unembed=True,
        fold_value_biases=True, tokenizer=None,
    )  # fmt: skip
    with reader:
        model = stream.hooked_from_reader(reader, tokenizer, model_name="t", options=options,
                                          extras={})  # fmt: skip
    expected = {layer: _simulated(layer, model.cfg) for layer in range(model.cfg.n_layers)}
    assert set(expected.values()) == {torch.device("cpu"), torch.device("meta")}
    placed = {}
    for names, device in calls:
        for name in names:
            if name.startswith("blocks."):
                placed.setdefault(int(name.split(".")[1]), set()).add(device)
            elif name.startswith("unembed."):
                assert device == torch.device("meta")  # with the last block
            else:
                assert device == torch.device("cpu"), name  # the embedding, with block 0
    assert placed == {layer: {device} for layer, device in expected.items()}
    for layer, block in enumerate(model.blocks):
        assert {p.device for p in block.parameters()} == {expected[layer]}


def test_hf_model_parameters_go_straight_to_the_device(monkeypatch, tiny_checkpoints):
    calls = _record_assignments(monkeypatch)
    reader, _ = open_llama_directory(tiny_checkpoints["mha"].path)
    with reader:
        model = stream.hf_model_from_reader(reader, dtype=torch.float32, device="meta")
    assert calls and all(device == torch.device("meta") for _, device in calls)
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_a_missing_tensor_is_reported(monkeypatch, tiny_checkpoints):
    reader, _ = open_llama_directory(tiny_checkpoints["mha"].path)
    layer_names = stream._OTHERS
    monkeypatch.setattr(stream, "_OTHERS", layer_names[:1])  # down_proj never read
    with reader, pytest.raises(ValueError, match="no weights were loaded for.*down_proj"):
        stream.hf_model_from_reader(reader, dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_weights_are_refused(tmp_path, tiny_tokenizer_dir, backend):
    from checkpoints import tiny_llama_config

    from lens_attn.errors import CheckpointError

    model = write_hf_checkpoint(
        tmp_path, tiny_llama_config("mha"), seed=1, tokenizer_dir=tiny_tokenizer_dir
    )
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["model.layers.1.mlp.up_proj.weight"][3, 2] = float("nan")
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="up_proj.weight holds 1 non-finite"):
        load_model(tmp_path, backend=backend, device="cpu")


# ---- progress ----------------------------------------------------------------------------------


def test_progress_is_one_line_per_stage_off_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    for _ in progress.progress_bar(range(3), desc="loading layers", unit="layer"):
        pass
    bar = progress.progress_bar(total=5, desc="ablation", unit="pass")
    bar.update(2)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("loading layers: 3/3 layer in ") and lines[0].endswith(" s")
    assert lines[1].startswith("ablation: 2/5 pass in ")
    for _ in progress.progress_bar(range(3), desc="quiet", enabled=False):
        pass
    assert capsys.readouterr().err == ""


def test_progress_is_a_bar_on_a_terminal(monkeypatch):
    from tqdm import tqdm

    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    bar = progress.progress_bar(range(2), desc="x", unit="step")
    assert isinstance(bar, tqdm)
    bar.close()
    assert not isinstance(progress.progress_bar(range(2), desc="x", enabled=False), tqdm)


def test_loading_reports_progress(monkeypatch, tiny_checkpoints, capsys):
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    load_model(tiny_checkpoints["gqa"].path, device="cpu")
    assert "loading layers: 3/3 layer in" in capsys.readouterr().err
    load_model(tiny_checkpoints["gqa"].path, device="cpu", progress=False)
    assert capsys.readouterr().err == ""
