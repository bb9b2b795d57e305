"""lens_attn.loading.rope: Llama 3.x ``llama3`` rope scaling, against transformers' logits.

A random-init checkpoint with a llama3 rope dict whose ``original_max_position_embeddings`` (16) is
far below its context (``max_position_embeddings`` 64), read with prompts of 48 tokens, so most
positions lie past the original context, where the scaling matters. d_head 16 gives 8 rotary
frequencies; with factor 4, low_freq_factor 0.5 and high_freq_factor 2, the wavelength bounds are
16 / 2 = 8 and 16 / 0.5 = 32, so the frequencies fall in all three regimes: kept (wavelength 6.3),
interpolated (19.9) and divided by the factor (62.8 and longer).

Reference: transformers' ``LlamaForCausalLM`` loading the directory. Tolerance 1e-4 on
log-probabilities (float32; see test_loading). Ignoring the scaling moves them by more than 0.01
(checked below), so the comparison can tell.
"""

import json
import shutil

import checkpoints
import pytest
import torch
from transformers import LlamaConfig

from lens_attn.compat import is_hooked
from lens_attn.loading import check_against_hf, load_model
from lens_attn.loading.rope import hooked_rope_fields

ATOL = 1e-4
LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "low_freq_factor": 0.5,
    "high_freq_factor": 2.0,
    "original_max_position_embeddings": 16,
}


def llama3_config(**changes) -> LlamaConfig:
    fields = dict(
        vocab_size=checkpoints.TINY_VOCAB_SIZE,
        hidden_size=48,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_parameters=LLAMA3,
        tie_word_embeddings=False,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    return LlamaConfig(**(fields | changes))


def long_tokens() -> torch.Tensor:
    tokens = torch.randint(
        3, checkpoints.TINY_VOCAB_SIZE, (2, 48), generator=torch.Generator().manual_seed(3)
    )
    tokens[:, 0] = 1
    return tokens


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory, tiny_tokenizer_dir):
    directory = tmp_path_factory.mktemp("llama3")
    checkpoints.write_hf_checkpoint(
        directory, llama3_config(), seed=41, tokenizer_dir=tiny_tokenizer_dir
    )
    return directory


@pytest.mark.parametrize("backend", checkpoints.BACKENDS)
def test_llama3_rope_matches_transformers_past_the_original_context(llama3_dir, backend):
    model = load_model(llama3_dir, backend=backend, device="cpu")
    check_against_hf(model, checkpoints.load_reference(llama3_dir), long_tokens(), atol=ATOL)
    assert model.cfg.n_ctx == 64  # max_position_embeddings, not the original context


@pytest.mark.hooked_only  # HookedTransformerConfig's NTK-by-parts fields
def test_hooked_config_fields(llama3_dir):
    cfg = load_model(llama3_dir, device="cpu").cfg
    assert cfg.use_NTK_by_parts_rope
    assert (cfg.NTK_by_parts_factor, cfg.NTK_original_ctx_len) == (4.0, 16)
    assert (cfg.NTK_by_parts_low_freq_factor, cfg.NTK_by_parts_high_freq_factor) == (0.5, 2.0)
    assert hooked_rope_fields({"rope_type": "default", "rope_theta": 1e4}) == {}


def test_the_scaling_is_visible(llama3_dir, tmp_path):
    # The same weights with plain rope: transformers' own outputs differ past position 16, so
    # agreeing above is evidence that the llama3 frequencies were used.
    scaled = checkpoints.load_reference(llama3_dir)
    (tmp_path / "config.json").write_text((llama3_dir / "config.json").read_text())
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    plain = type(scaled)(LlamaConfig.from_dict(raw)).eval()
    plain.load_state_dict(scaled.state_dict())
    with torch.no_grad():
        a = scaled(long_tokens()).logits.log_softmax(-1)
        b = plain(long_tokens()).logits.log_softmax(-1)
    assert (a - b)[:, 20:].abs().max() > 0.01


def test_legacy_rope_scaling_key(llama3_dir, tmp_path):
    # Llama 3.1's own config.json spells it rope_scaling with rope_theta at the top level.
    for path in llama3_dir.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    raw = json.loads((llama3_dir / "config.json").read_text())
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope.pop("rope_theta")
    raw["rope_scaling"] = rope
    (tmp_path / "config.json").write_text(json.dumps(raw))
    model = load_model(tmp_path, device="cpu")
    check_against_hf(model, checkpoints.load_reference(tmp_path), long_tokens(), atol=ATOL)


@pytest.mark.parametrize(
    "rope, match",
    [
        ({"rope_type": "yarn", "factor": 4.0}, "rope_parameters of type 'yarn' is not supported"),
        ({"rope_type": "longrope"}, "valid: null, type 'default' .* or type 'llama3'"),
        (LLAMA3 | {"factor": None}, "missing or not numeric: factor"),
        (
            {k: v for k, v in LLAMA3.items() if k != "original_max_position_embeddings"},
            "missing or not numeric: original_max_position_embeddings",
        ),
        (LLAMA3 | {"attention_factor": 2.0}, r"fields \['attention_factor'\]"),
    ],
    ids=["yarn", "longrope", "no-factor", "no-original-context", "attention-factor"],
)
def test_other_rope_types_are_refused(llama3_dir, tmp_path, rope, match):
    for path in llama3_dir.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    raw = json.loads((llama3_dir / "config.json").read_text())
    raw["rope_parameters"] = rope
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=match):
        load_model(tmp_path, device="cpu")


def test_llama_3_1_context_is_not_capped(tmp_path, tiny_tokenizer_dir):
    # Llama 3.1's rope and context (TransformerLens's own Llama 3.1 configs cap n_ctx at 2048).
    rope = LLAMA3 | dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    config = llama3_config(
        max_position_embeddings=131072,
        rope_parameters=rope | {"original_max_position_embeddings": 8192, "rope_theta": 5e5},
    )
    checkpoints.write_hf_checkpoint(tmp_path, config, seed=42, tokenizer_dir=tiny_tokenizer_dir)
    model = load_model(tmp_path, device="cpu")
    assert model.cfg.n_ctx == 131072
    if is_hooked(model):  # the bridge runs transformers' own rotary module
        assert model.cfg.NTK_original_ctx_len == 8192
    check_against_hf(model, checkpoints.load_reference(tmp_path), long_tokens(), atol=ATOL)


@pytest.mark.hooked_only
def test_model_name_keeps_the_checkpoint_context(monkeypatch, tmp_path, tiny_checkpoints):
    # A TransformerLens name goes through HookedTransformer.from_pretrained, whose hard-coded
    # configs cap some contexts; lens-attn passes the cached config.json's max_position_embeddings.
    from lens_attn.compat import HookedTransformer

    snapshot = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--meta-llama--Llama-2-7b-hf"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(snapshot)
    shutil.copytree(tiny_checkpoints["gqa"].path, repo / "snapshots" / snapshot)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    seen = {}

    def from_pretrained(name, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(HookedTransformer, "from_pretrained", from_pretrained)
    with pytest.raises(RuntimeError, match="stop here"):
        load_model("Llama-2-7b", device="cpu")
    assert seen["n_ctx"] == 64  # the tiny checkpoint's max_position_embeddings
