"""lens_attn.loading: every source, both backends, against transformers' LlamaForCausalLM.

Reference: the HF directory loaded back with plain transformers (eager attention, float32), never
through lens_attn. Tolerance: 1e-4 on log-probabilities in float32. Folding the RMSNorm weights
and centring the unembedding reorder float32 sums (~1e-7 relative each) over 2-3 layers with
initializer_range 0.2, giving ~3e-6 in practice; a real bug (a missed rotary permutation, a wrong
rope_theta, a swapped axis) moves them by more than 0.1.
"""

import json
import shutil
import socket

import checkpoints
import pytest
import torch
from transformers import AutoTokenizer, GPT2Config

from lens_attn import loading
from lens_attn.loading import (
    ModelNotCachedError,
    check_against_hf,
    load_model,
    meta,
    resolve_backend,
    resolve_device,
    resolve_dtype,
)

BACKENDS = checkpoints.BACKENDS  # "hooked" only where TransformerLens has it (3.9)
ATOL = 1e-4  # see the module docstring


def sample_tokens(vocab: int = checkpoints.TINY_VOCAB_SIZE) -> torch.Tensor:
    tokens = torch.randint(3, vocab, (2, 16), generator=torch.Generator().manual_seed(1))
    tokens[:, 0] = 1  # BOS
    return tokens


def assert_patterns(model, n_layers: int, n_heads: int) -> None:
    """Every layer has hook_pattern and it holds causal rows that sum to 1."""
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]
    assert all(name in model.hook_dict for name in names)
    tokens = sample_tokens()
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
    for name in names:
        pattern = cache[name]
        assert pattern.shape == (2, n_heads, 16, 16)
        torch.testing.assert_close(pattern.sum(-1), torch.ones(2, n_heads, 16))
        assert torch.all(pattern.triu(diagonal=1) == 0)


def assert_config_matches(cfg, hf) -> None:
    """Sizes, GQA, rope_theta and eps come from config.json (TransformerLens's cfg names)."""
    n_kv = hf.num_key_value_heads if hf.num_key_value_heads != hf.num_attention_heads else None
    assert (cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads) == (
        hf.num_hidden_layers,
        hf.num_attention_heads,
        n_kv,
    )
    sizes = (cfg.d_model, cfg.d_head, cfg.d_mlp, cfg.d_vocab, cfg.n_ctx)
    assert sizes == (24, hf.head_dim, hf.intermediate_size, hf.vocab_size, 64)
    assert cfg.rotary_base == hf.rope_parameters["rope_theta"]
    assert cfg.eps == hf.rms_norm_eps


def block_network(monkeypatch) -> list[tuple]:
    """Make every way of opening a connection fail; return the list of attempts made.

    Attempts raise OSError, which some clients swallow (huggingface_hub does for optional calls),
    so a test that wants *no* attempt must check the returned list, not just that nothing raised.
    """
    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError(f"test: network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def use_hub_cache(monkeypatch, hf_home) -> None:
    """Point the Hugging Face cache at ``hf_home`` and leave offline mode off."""
    monkeypatch.setenv("HF_HOME", str(hf_home))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def references(tiny_checkpoints):
    """Each kind's HF directory read back with plain transformers."""
    return {kind: checkpoints.load_reference(c.path) for kind, c in tiny_checkpoints.items()}


@pytest.fixture(scope="module", params=checkpoints.KINDS, ids=checkpoints.KINDS)
def meta_dir(request, tmp_path_factory, tiny_checkpoints, tiny_tokenizer_dir):
    """A 2-shard Meta-layout copy of each kind's checkpoint."""
    kind = request.param
    path = tmp_path_factory.mktemp(f"meta-{kind}")
    checkpoints.write_meta_checkpoint(
        path, tiny_checkpoints[kind].hf_model, tokenizer_dir=tiny_tokenizer_dir, n_shards=2
    )
    return kind, path


@pytest.fixture
def hf_copy(tmp_path, tiny_checkpoints):
    """A private copy of the MHA checkpoint directory that a test may break."""
    path = tmp_path / "copy"
    shutil.copytree(tiny_checkpoints["mha"].path, path)
    return path


def edit_json(path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ---- every source matches transformers ----------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_hf_directory_matches_transformers(hf_checkpoint, references, backend):
    model = load_model(hf_checkpoint.path, backend=backend, device="cpu")
    config = hf_checkpoint.hf_model.config
    check_against_hf(model, references[hf_checkpoint.kind], sample_tokens(), atol=ATOL)
    assert_patterns(model, config.num_hidden_layers, config.num_attention_heads)
    assert_config_matches(model.cfg, config)


@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_layout_matches_transformers(meta_dir, references, backend):
    kind, path = meta_dir
    model = load_model(path, backend=backend, device="cpu")
    config = references[kind].config
    check_against_hf(model, references[kind], sample_tokens(), atol=ATOL)
    assert_patterns(model, config.num_hidden_layers, config.num_attention_heads)


@pytest.mark.parametrize(
    ("kind", "fmt", "backend"),
    [
        pytest.param("mha", "bin", "hooked", marks=pytest.mark.hooked_only),
        ("mha", "bin", "bridge"),
        ("gqa", "bin", "bridge"),
        pytest.param("gqa", "sharded", "hooked", marks=pytest.mark.hooked_only),
        ("gqa", "sharded", "bridge"),
    ],
)
def test_bin_and_sharded_weights(tmp_path, tiny_tokenizer_dir, kind, fmt, backend):
    config = checkpoints.tiny_llama_config(kind)
    checkpoints.write_hf_checkpoint(
        tmp_path, config, seed=5, tokenizer_dir=tiny_tokenizer_dir, fmt=fmt
    )
    model = load_model(tmp_path, backend=backend, device="cpu")
    check_against_hf(model, checkpoints.load_reference(tmp_path), sample_tokens(), atol=ATOL)


def test_single_shard_meta_layout(tmp_path, tiny_checkpoints, tiny_tokenizer_dir, references):
    checkpoints.write_meta_checkpoint(
        tmp_path, tiny_checkpoints["gqa"].hf_model, tokenizer_dir=tiny_tokenizer_dir, n_shards=1
    )
    check_against_hf(load_model(tmp_path, device="cpu"), references["gqa"], sample_tokens())


def test_meta_tokenizer_found_one_level_up(tmp_path, tiny_checkpoints, tiny_tokenizer_dir):
    model_dir = tmp_path / "llama-2-tiny"  # Meta's download: tokenizer.model beside model dirs
    checkpoints.write_meta_checkpoint(
        model_dir, tiny_checkpoints["mha"].hf_model, tokenizer_dir=tiny_tokenizer_dir
    )
    shutil.move(model_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    model = load_model(model_dir, device="cpu")
    assert model.to_tokens("def f(x):").shape[1] > 1


def test_convert_meta_to_hf_round_trip(meta_dir, tmp_path, references):
    kind, path = meta_dir
    out = meta.convert_meta_to_hf(path, tmp_path / "hf")
    converted = checkpoints.load_reference(out)  # plain transformers reads the converted directory
    tokens = sample_tokens()
    with torch.no_grad():
        torch.testing.assert_close(converted(tokens).logits, references[kind](tokens).logits)
    check_against_hf(load_model(out, device="cpu"), references[kind], tokens, atol=ATOL)


@pytest.mark.hooked_only  # class names and weight layout of HookedTransformer
def test_processing_flags(tiny_checkpoints, references):
    checkpoint = tiny_checkpoints["gqa"]  # tied embeddings: W_E and W_U share storage in HF
    folded = load_model(checkpoint.path, device="cpu")
    raw = load_model(
        checkpoint.path,
        device="cpu",
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    )
    assert type(folded.blocks[0].ln1).__name__ == "RMSNormPre"
    assert type(raw.blocks[0].ln1).__name__ == "RMSNorm"
    # unprocessed weights are exactly transformers' (transposed into TransformerLens's layout)
    hf = checkpoint.hf_model
    torch.testing.assert_close(raw.W_E, hf.model.embed_tokens.weight, rtol=0, atol=0)
    torch.testing.assert_close(raw.W_U, hf.lm_head.weight.T, rtol=0, atol=0)
    torch.testing.assert_close(folded.W_U.mean(-1), torch.zeros(24), rtol=0, atol=1e-6)
    check_against_hf(raw, references["gqa"], sample_tokens(), atol=ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16(tiny_checkpoints, references, backend):
    model = load_model(
        tiny_checkpoints["gqa"].path, backend=backend, device="cpu", dtype="bfloat16"
    )
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # bfloat16 keeps 8 mantissa bits (~4e-3 relative per op); with these large random weights the
    # log-probs land ~0.1 from float32's, a wrong weight ~5. 0.5 separates the two.
    check_against_hf(model, references["gqa"], sample_tokens(), atol=0.5)


def test_dtype_and_device_spellings():
    assert resolve_dtype(None) is torch.float32
    assert resolve_dtype(torch.float16) is torch.float16
    assert resolve_dtype("torch.bfloat16") is torch.bfloat16
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type in ("cpu", "cuda")


def test_tiny_model_fixture(tiny_model, tiny_hf_model):
    assert tiny_model.cfg.n_layers == 3 and tiny_model.cfg.n_key_value_heads == 2
    check_against_hf(tiny_model, tiny_hf_model, sample_tokens(), atol=ATOL)


# ---- no network ------------------------------------------------------------------------------


def test_local_loading_makes_no_network_connection(
    monkeypatch, tmp_path, tiny_checkpoints, tiny_tokenizer_dir
):
    meta = checkpoints.write_meta_checkpoint(
        tmp_path, tiny_checkpoints["mha"].hf_model, tokenizer_dir=tiny_tokenizer_dir
    )
    attempts = block_network(monkeypatch)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # prove it without offline mode's help
    for path in (tiny_checkpoints["gqa"].path, meta):
        for backend in checkpoints.AVAILABLE_BACKENDS:
            model = load_model(path, backend=backend, device="cpu")
            _, cache = model.run_with_cache(model.to_tokens(["def f(x): return x"]))
            assert "blocks.0.attn.hook_pattern" in cache
    assert attempts == []


# ---- TransformerLens model names ---------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["meta-llama/Llama-2-7b-hf", "Llama-2-7b"])
def test_model_name_not_cached_offline(monkeypatch, tmp_path, backend, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    with pytest.raises(ModelNotCachedError, match="not in the local Hugging Face cache") as info:
        load_model(name, backend=backend, device="cpu")
    message = str(info.value)
    assert "'meta-llama/Llama-2-7b-hf'" in message and str(tmp_path) in message
    assert "pass a local directory" in message
    assert isinstance(info.value, FileNotFoundError)


def test_model_name_not_cached_without_network(monkeypatch, tmp_path):
    use_hub_cache(monkeypatch, tmp_path)
    block_network(monkeypatch)
    with pytest.raises(ModelNotCachedError, match="cannot be downloaded: no network"):
        load_model("meta-llama/Llama-2-7b-chat-hf", device="cpu")


def test_model_name_loads_from_the_cache_without_network(
    monkeypatch, tmp_path, tiny_checkpoints, references
):
    """A cached model is read with local_files_only: no update check, so no network at all.

    The cache entry holds the tiny GQA checkpoint under a real name. Only the bridge can be
    checked this way: TransformerLens's hooked path uses its hard-coded 7B config for this name.
    """
    snapshot = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--meta-llama--Llama-2-7b-hf"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(snapshot)
    shutil.copytree(tiny_checkpoints["gqa"].path, repo / "snapshots" / snapshot)
    use_hub_cache(monkeypatch, tmp_path)
    attempts = block_network(monkeypatch)
    model = load_model("Llama-2-7b", backend="bridge", device="cpu")
    check_against_hf(model, references["gqa"], sample_tokens(), atol=ATOL)
    assert attempts == []


def test_unknown_model_name_suggests_close_matches():
    with pytest.raises(
        ValueError, match=r"unknown model .*did you mean .*meta-llama/Llama-2-7b-hf"
    ):
        load_model("meta-llama/Llama-2-7b-hff", device="cpu")
    with pytest.raises(ValueError, match=r"did you mean .*Llama-2-13b-chat"):
        load_model("Llama-2-13b-chta", device="cpu")


def test_other_families_and_llama1_are_refused():
    with pytest.raises(ValueError, match="'gpt2'.*not a Llama-family model"):
        load_model("gpt2", device="cpu")
    with pytest.raises(ValueError, match="not hosted on the Hugging Face Hub"):
        load_model("llama-7b", device="cpu")


# ---- bad input -------------------------------------------------------------------------------


def test_empty_source():
    with pytest.raises(ValueError, match="empty string"):
        load_model("", device="cpu")


@pytest.mark.parametrize("source", ["./no-such-dir", "~/no/such/dir", "models/llama/7b"])
def test_missing_path(source):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_model(source, device="cpu")


def test_missing_path_object(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_model(tmp_path / "absent", device="cpu")


def test_file_instead_of_directory(hf_copy):
    with pytest.raises(NotADirectoryError, match="expected a checkpoint directory"):
        load_model(hf_copy / "config.json", device="cpu")


def test_missing_bundled_checkpoint(monkeypatch, tmp_path):
    monkeypatch.setattr(loading, "BUNDLED_CHECKPOINT", tmp_path / "tiny-llama-2")
    with pytest.raises(
        FileNotFoundError, match=r"missing.*python experiments/train_tiny_llama\.py"
    ):
        load_model(device="cpu")


def test_directory_without_config_or_params(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"not a Llama checkpoint.*config\.json.*params\.json"):
        load_model(tmp_path, device="cpu")


def test_gpt2_config_is_not_llama(tmp_path):
    GPT2Config(n_layer=1, n_embd=24, n_head=3).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a Llama checkpoint: model_type 'gpt2'"):
        load_model(tmp_path, device="cpu")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling of type 'linear'"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "type 'dynamic'"),
        ({"attention_bias": True}, "attention_bias=true is not supported"),
        ({"mlp_bias": True}, "mlp_bias=true is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported; valid: silu"),
        ({"head_dim": 6}, "head_dim 6 is inconsistent.*valid: 8"),
        ({"vocab_size": 512}, "vocab_size=512 but model.embed_tokens.weight has 400 rows"),
        ({"intermediate_size": 48}, r"mlp\.\w+\.weight has shape .* but the config implies"),
        ({"architectures": ["MistralForCausalLM"]}, "not a Llama checkpoint"),
    ],
    ids=[
        "rope-scaling",
        "rope-parameters",
        "attn-bias",
        "mlp-bias",
        "act",
        "head-dim",
        "vocab",
        "d-mlp",
        "architecture",
    ],  # fmt: skip
)
def test_unsupported_config_is_refused(hf_copy, change, match):
    edit_json(hf_copy / "config.json", **change)
    with pytest.raises(ValueError, match=match):
        load_model(hf_copy, device="cpu")


def test_tokenizer_larger_than_embedding(hf_copy, tiny_checkpoints):
    tokenizer = AutoTokenizer.from_pretrained(str(hf_copy), local_files_only=True)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(5)])
    tokenizer.save_pretrained(str(hf_copy))
    with pytest.raises(ValueError, match="tokenizer has 405 tokens but the embedding has 400 rows"):
        load_model(hf_copy, device="cpu")
    path = tiny_checkpoints["gqa"].path  # a good directory, a bad tokenizer argument
    with pytest.raises(ValueError, match="tokenizer has 405 tokens"):
        load_model(path, device="cpu", backend="bridge", tokenizer=tokenizer)


def test_missing_weights_and_tokenizer(hf_copy):
    (hf_copy / "tokenizer.json").unlink()
    (hf_copy / "tokenizer.model").unlink()
    with pytest.raises(
        FileNotFoundError, match="no tokenizer in .*tokenizer.json.*tokenizer.model"
    ):
        load_model(hf_copy, device="cpu")
    (hf_copy / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights in .*model.safetensors"):
        load_model(hf_copy, device="cpu")


def test_missing_safetensors_shard(tmp_path, tiny_tokenizer_dir):
    config = checkpoints.tiny_llama_config("mha")
    checkpoints.write_hf_checkpoint(
        tmp_path, config, seed=3, tokenizer_dir=tiny_tokenizer_dir, fmt="sharded"
    )
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"incomplete.*{shard.name}"):
        load_model(tmp_path, device="cpu")


@pytest.mark.parametrize("missing", ["consolidated.01.pth", "consolidated.00.pth"])
def test_meta_missing_shard(tmp_path, tiny_checkpoints, tiny_tokenizer_dir, missing):
    checkpoints.write_meta_checkpoint(
        tmp_path, tiny_checkpoints["gqa"].hf_model, tokenizer_dir=tiny_tokenizer_dir, n_shards=2
    )
    (tmp_path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
        load_model(tmp_path, device="cpu")


def test_meta_bad_params(tmp_path, tiny_checkpoints, tiny_tokenizer_dir):
    checkpoints.write_meta_checkpoint(
        tmp_path, tiny_checkpoints["mha"].hf_model, tokenizer_dir=tiny_tokenizer_dir
    )
    params = tmp_path / "params.json"
    original = params.read_text()
    edit_json(params, qkv_bias=True)
    with pytest.raises(ValueError, match=r"fields lens-attn does not understand: \['qkv_bias'\]"):
        load_model(tmp_path, device="cpu")
    params.write_text(original)
    edit_json(params, rope_theta=1e6)
    with pytest.raises(ValueError, match="rope.freqs does not match rope_theta=1000000"):
        load_model(tmp_path, device="cpu")
    params.write_text(original)
    edit_json(params, multiple_of=256)
    with pytest.raises(ValueError, match="w1 has 40 rows but params.json .* gives 256"):
        load_model(tmp_path, device="cpu")
    params.write_text(original)
    (tmp_path / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.model"):
        load_model(tmp_path, device="cpu")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dtype": "float64"}, "unknown dtype 'float64'; valid: float32, bfloat16, float16"),
        ({"dtype": torch.int8}, "unknown dtype torch.int8; valid: float32"),
        ({"device": "tpu"}, "unknown device 'tpu'; valid: cpu, cuda"),
        ({"device": "cpu", "n_devices": 2}, "n_devices=2 needs device='cuda'"),
        ({"device": "cpu", "n_devices": 0}, "n_devices must be a positive integer"),
    ],
    ids=["dtype", "torch-dtype", "device", "n-devices-cpu", "n-devices-zero"],
)
def test_bad_arguments(tiny_checkpoints, kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_model(tiny_checkpoints["mha"].path, **kwargs)


def test_unknown_backend(tiny_checkpoints):
    with pytest.raises(
        ValueError, match="unknown backend 'hooked_transformer'; valid: hooked, bridge"
    ):
        resolve_backend("hooked_transformer")
    # Under this suite's runtime type checking (jaxtyping + beartype) the Literal annotation stops
    # the call first with a TypeCheckError (a TypeError); without it, load_model's own ValueError.
    with pytest.raises((ValueError, TypeError), match="hooked_transformer"):
        load_model(tiny_checkpoints["mha"].path, backend="hooked_transformer")


def test_unknown_keyword_for_local_checkpoint(tiny_checkpoints):
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['first_n_layers'\]"):
        load_model(tiny_checkpoints["mha"].path, device="cpu", first_n_layers=1)


def test_check_against_hf_reports_a_mismatch(tiny_checkpoints, references):
    model = load_model(tiny_checkpoints["mha"].path, device="cpu")
    with torch.no_grad():
        model.blocks[0].attn.W_Q[0, 0, 0] += 1.0  # a private model: mutating it is fine
    with pytest.raises(AssertionError, match="log-probabilities differ"):
        check_against_hf(model, references["mha"], sample_tokens())
