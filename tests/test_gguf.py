"""lens_attn.loading.gguf: GGUF files written here, against transformers reading the same file.

The files are written by ``gguf_files.write_gguf`` (llama.cpp's conventions: q/k rows permuted to
GGML's adjacent-pair order) from a random-init Llama with GQA (6 query heads on 2 key/value heads)
and distinct sizes. Reference: ``LlamaForCausalLM.from_pretrained(dir, gguf_file=name)``, which
dequantizes with the same ``gguf`` package but renames and un-permutes with its own code, so a wrong
q/k permutation, name or shape here shows up as a log-prob difference of order 1.

Tolerance: 1e-4 on log-probabilities in float32, as in test_loading (folding and centring reorder
float32 sums; ~1e-6 in practice). Both sides dequantize the same bytes, so a quantized file is
compared exactly like an F32 one; quantization error only shows against the original float weights.
"""

import shutil

import gguf_files
import numpy as np
import pytest
import torch
from checkpoints import TINY_VOCAB_SIZE, random_llama
from transformers import AutoTokenizer, LlamaForCausalLM

from lens_attn.loading import check_against_hf, load_model
from lens_attn.loading.gguf import (
    find_gguf_file,
    from_ggml_order,
    gguf_tokenizer,
    read_gguf_checkpoint,
    supported_tensor_types,
)

ATOL = 1e-4  # see the module docstring
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0")
NAME = "tiny.gguf"


def sample_tokens() -> torch.Tensor:
    tokens = torch.randint(3, TINY_VOCAB_SIZE, (2, 21), generator=torch.Generator().manual_seed(5))
    tokens[:, 0] = 1  # BOS
    return tokens


@pytest.fixture(scope="module")
def source_model():
    return random_llama(gguf_files.gguf_config(), seed=31)


@pytest.fixture(scope="module")
def gguf_dirs(tmp_path_factory, source_model, tiny_tokenizer_dir):
    """tensor type -> a directory holding only ``tiny.gguf`` of that type."""
    out = {}
    for kind in TYPES:
        directory = tmp_path_factory.mktemp(f"gguf-{kind}")
        gguf_files.write_gguf(
            directory / NAME,
            source_model,
            tokenizer_model=tiny_tokenizer_dir / "tokenizer.model",
            tensor_type=kind,
        )
        out[kind] = directory
    return out


def transformers_reference(directory, dtype=torch.float32) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(
        str(directory), gguf_file=NAME, dtype=dtype, attn_implementation="eager"
    )
    return model.eval()


# ---- loading matches transformers -------------------------------------------------------------


@pytest.mark.parametrize("kind", TYPES)
def test_gguf_file_matches_transformers(gguf_dirs, kind):
    model = load_model(gguf_dirs[kind] / NAME, device="cpu")
    check_against_hf(model, transformers_reference(gguf_dirs[kind]), sample_tokens(), atol=ATOL)
    assert model.cfg.n_key_value_heads == 2 and model.cfg.n_heads == 6
    assert (model.cfg.d_model, model.cfg.d_head, model.cfg.d_mlp) == (96, 16, 160)
    assert model.cfg.n_ctx == 128 and model.cfg.rotary_base == 50000.0


@pytest.mark.parametrize("kind", ("F32", "Q8_0"))
def test_bridge_backend(gguf_dirs, kind):
    model = load_model(gguf_dirs[kind], backend="bridge", device="cpu")
    check_against_hf(model, transformers_reference(gguf_dirs[kind]), sample_tokens(), atol=ATOL)
    assert "blocks.2.attn.hook_pattern" in model.hook_dict


def test_f32_file_is_the_original_model(gguf_dirs, source_model):
    # F32 stores the weights bit for bit: the loaded model computes what the writer's model did.
    model = load_model(gguf_dirs["F32"] / NAME, device="cpu")
    check_against_hf(model, source_model, sample_tokens(), atol=ATOL)


def test_quantized_weights_are_close_to_the_original(gguf_dirs, source_model):
    # Q8_0 keeps 8 bits per weight with one scale per 32 (relative error ~1/256); Q4_0 4 bits.
    original = source_model.model.layers[1].self_attn.q_proj.weight
    for kind, rtol in (("F16", 1e-3), ("Q8_0", 2e-2), ("Q4_0", 0.3)):
        hf_model, _ = read_gguf_checkpoint(gguf_dirs[kind])
        loaded = hf_model.model.layers[1].self_attn.q_proj.weight
        assert (loaded - original).norm() / original.norm() < rtol, kind


def test_config_matches_transformers(gguf_dirs):
    ours, _ = read_gguf_checkpoint(gguf_dirs["F32"] / NAME)
    theirs = transformers_reference(gguf_dirs["F32"]).config
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "max_position_embeddings",
        "rms_norm_eps",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert getattr(ours.config, key) == getattr(theirs, key), key
    assert ours.config.rope_parameters["rope_theta"] == theirs.rope_parameters["rope_theta"]
    assert getattr(ours.config, "quantization_config", None) is None


def test_tied_embeddings(tmp_path, tiny_tokenizer_dir):
    # No output.weight in the file means tied input/output embeddings, as llama.cpp writes them.
    model = random_llama(gguf_files.gguf_config(tie_word_embeddings=True), seed=32)
    gguf_files.write_gguf(
        tmp_path / NAME, model, tokenizer_model=tiny_tokenizer_dir / "tokenizer.model"
    )
    loaded = load_model(tmp_path / NAME, device="cpu")
    check_against_hf(loaded, transformers_reference(tmp_path), sample_tokens(), atol=ATOL)
    check_against_hf(loaded, model, sample_tokens(), atol=ATOL)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_dtype_is_honoured(gguf_dirs, dtype):
    model = load_model(gguf_dirs["Q8_0"], device="cpu", dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    # 8 (bfloat16) / 11 (float16) mantissa bits: log-probs land ~0.05 from float32's, a wrong
    # weight moves them by ~5. 0.5 separates the two.
    check_against_hf(model, transformers_reference(gguf_dirs["Q8_0"]), sample_tokens(), atol=0.5)


def test_tokenizer_is_read_from_the_file(gguf_dirs):
    model = load_model(str(gguf_dirs["F16"] / NAME), device="cpu")
    theirs = AutoTokenizer.from_pretrained(str(gguf_dirs["F16"]), gguf_file=NAME)
    text = "def f(x):\n    return x + 1"
    expected = [theirs.bos_token_id] + theirs(text, add_special_tokens=False).input_ids
    assert model.to_tokens(text)[0].tolist() == expected
    assert model.tokenizer.bos_token_id == 1
    # built without AutoTokenizer: the same class, special tokens and encodings as its reading
    ours = gguf_tokenizer(gguf_dirs["F16"] / NAME)
    assert type(ours) is type(theirs)
    assert ours.special_tokens_map == theirs.special_tokens_map
    for text in ["Hello world", " leading space", "ünïcødé 日本語", "a\n\n\tb  c", "</s><s>x"]:
        assert ours(text).input_ids == theirs(text).input_ids, text
        assert ours.decode(ours(text).input_ids) == theirs.decode(theirs(text).input_ids)


def test_file_without_a_tokenizer(tmp_path, source_model, gguf_dirs):
    gguf_files.write_gguf(tmp_path / NAME, source_model, tokenizer_model=None)
    with pytest.raises(ValueError, match=rf"could not read the tokenizer stored in .*{NAME}"):
        load_model(tmp_path / NAME, device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dirs["F32"]), gguf_file=NAME)
    model = load_model(tmp_path / NAME, device="cpu", tokenizer=tokenizer)
    check_against_hf(model, source_model, sample_tokens(), atol=ATOL)


def test_from_ggml_order_inverts_llama_cpp_permute():
    weight = torch.arange(4 * 8 * 3, dtype=torch.float32).reshape(4 * 8, 3)
    ggml = torch.from_numpy(gguf_files.to_ggml_order(weight, 4))
    assert not torch.equal(ggml, weight)
    torch.testing.assert_close(from_ggml_order(ggml, 4), weight, rtol=0, atol=0)


# ---- sources and bad input ----------------------------------------------------------------------


def test_find_gguf_file(tmp_path, gguf_dirs):
    assert find_gguf_file(gguf_dirs["F32"]) == gguf_dirs["F32"] / NAME
    assert find_gguf_file(gguf_dirs["F32"] / NAME) == gguf_dirs["F32"] / NAME
    assert find_gguf_file(tmp_path) is None
    (tmp_path / "config.json").write_text("{}")
    shutil.copy(gguf_dirs["F32"] / NAME, tmp_path / NAME)
    assert find_gguf_file(tmp_path) is None  # a HF directory with a stray .gguf stays HF


def test_directory_with_two_gguf_files(tmp_path, gguf_dirs):
    shutil.copy(gguf_dirs["F32"] / NAME, tmp_path / "a.gguf")
    shutil.copy(gguf_dirs["F16"] / NAME, tmp_path / "b.gguf")
    with pytest.raises(ValueError, match=r"holds 2 GGUF files \(a.gguf, b.gguf\)"):
        load_model(tmp_path, device="cpu")


def test_truncated_file(tmp_path, gguf_dirs):
    data = (gguf_dirs["Q8_0"] / NAME).read_bytes()
    for cut in (len(data) // 2, 200):  # inside the tensor data; inside the metadata
        (tmp_path / NAME).write_bytes(data[:cut])
        with pytest.raises(ValueError, match=rf"{NAME} is not a readable GGUF file \(truncated"):
            load_model(tmp_path / NAME, device="cpu")


def test_not_a_gguf_file(tmp_path):
    (tmp_path / NAME).write_bytes(b"PK\x03\x04 this is a zip, not a GGUF file" * 10)
    with pytest.raises(ValueError, match=rf"{NAME} is not a GGUF file: it starts with b'PK"):
        load_model(tmp_path / NAME, device="cpu")


def test_unsupported_tensor_type(tmp_path, source_model, tiny_tokenizer_dir):
    # Q8_1 (32 weights per 40-byte block) has no dequantization in the gguf package.
    rows, cols = source_model.model.embed_tokens.weight.shape
    raw = np.zeros((rows, cols // 32 * 40), dtype=np.uint8)
    gguf_files.write_gguf(
        tmp_path / NAME,
        source_model,
        tokenizer_model=tiny_tokenizer_dir / "tokenizer.model",
        raw_override={"token_embd.weight": (raw, "Q8_1")},
    )
    with pytest.raises(
        ValueError, match=r"token_embd.weight has type Q8_1, .*cannot dequantize; valid: F32, F16"
    ):
        load_model(tmp_path / NAME, device="cpu")


def test_other_architecture(tmp_path, source_model, tiny_tokenizer_dir):
    gguf_files.write_gguf(
        tmp_path / NAME,
        source_model,
        tokenizer_model=tiny_tokenizer_dir / "tokenizer.model",
        architecture="qwen2",
    )
    with pytest.raises(
        ValueError, match=r"general.architecture is 'qwen2'; .* architecture 'llama'"
    ):
        load_model(tmp_path / NAME, device="cpu")


def test_rope_scaling_is_refused(tmp_path, source_model, tiny_tokenizer_dir):
    gguf_files.write_gguf(
        tmp_path / NAME,
        source_model,
        tokenizer_model=tiny_tokenizer_dir / "tokenizer.model",
        extra_metadata={"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0},
    )
    with pytest.raises(ValueError, match=r"rope scaling of type yarn is not supported"):
        load_model(tmp_path / NAME, device="cpu")


def test_llama3_rope_factors_are_refused(tmp_path, source_model, tiny_tokenizer_dir):
    # llama.cpp stores Llama 3.1's rope scaling as per-frequency factors in rope_freqs.weight
    # (transformers' GGUF reader drops that tensor and would load the model without the scaling).
    gguf_files.write_gguf(
        tmp_path / NAME,
        source_model,
        tokenizer_model=tiny_tokenizer_dir / "tokenizer.model",
        extra_tensors={"rope_freqs.weight": np.ones(8, dtype=np.float32)},
    )
    with pytest.raises(ValueError, match=r"rope scaling of type llama3 \(a rope_freqs.weight"):
        load_model(tmp_path / NAME, device="cpu")


def test_supported_tensor_types():
    valid = supported_tensor_types()
    for name in ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K"):
        assert name in valid
    for name in ("Q8_1", "Q8_K", "I32"):
        assert name not in valid
