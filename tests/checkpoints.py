"""Builders for tiny random Llama checkpoints on disk, shared by the test modules.

Sizes are deliberately distinct (d_model 24, d_head 8 or 4, d_mlp 40 or 36, 3 or 6 heads, vocab 400)
so that a swapped axis fails loudly instead of broadcasting. Two kinds:

``"mha"``  2 layers, 3 heads = 3 key/value heads, d_head 8, d_mlp 40, rope_theta 10000, untied.
``"gqa"``  3 layers, 6 query heads sharing 2 key/value heads, d_head 4, d_mlp 36, rope_theta 500000,
           tied input/output embeddings.

``write_meta_checkpoint`` is the test-side inverse of ``lens_attn.loading.meta`` and is written
from Meta's ``model.py``/fairscale conventions, not from the loader: it un-permutes q/k rows to
Meta's adjacent-pair rotary order and splits every tensor the way model-parallel ranks hold it.
"""

import json
import shutil
from pathlib import Path
from typing import Literal, get_args

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lens_attn.compat import HAS_HOOKED

Kind = Literal["mha", "gqa"]
KINDS: tuple[str, ...] = get_args(Kind)
Format = Literal["safetensors", "sharded", "bin"]

# load_model backends as test parameters: "hooked" is skipped where TransformerLens has none (4.x)
HOOKED = pytest.param("hooked", marks=pytest.mark.hooked_only)
BACKENDS = (HOOKED, "bridge")
AVAILABLE_BACKENDS: tuple[str, ...] = ("hooked", "bridge") if HAS_HOOKED else ("bridge",)

TINY_VOCAB_SIZE = 400  # SentencePiece pieces: 3 specials + 256 byte-fallback pieces + 141 merges
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")


def tiny_llama_config(kind: Kind, *, vocab_size: int = TINY_VOCAB_SIZE) -> LlamaConfig:
    """A tiny ``LlamaConfig`` of the given kind (see the module docstring for the sizes)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid: {', '.join(KINDS)}")
    sizes = {
        "mha": dict(num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=3,
                    head_dim=8, intermediate_size=40, rope_theta=10000.0, tie=False),
        "gqa": dict(num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
                    head_dim=4, intermediate_size=36, rope_theta=500000.0, tie=True),
    }[kind]  # fmt: skip
    rope_theta, tie = sizes.pop("rope_theta"), sizes.pop("tie")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=24,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        tie_word_embeddings=tie,
        initializer_range=0.2,  # large weights so attention patterns are far from uniform
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        **sizes,
    )


def train_tiny_tokenizer(directory: Path) -> Path:
    """Train a byte-fallback SentencePiece BPE on ``pydoc_data.topics`` and save it HF-style.

    Writes ``tokenizer.model`` plus transformers' ``tokenizer.json``/``tokenizer_config.json`` into
    ``directory`` and returns it. unk=0, bos=1, eos=2, no pad, :data:`TINY_VOCAB_SIZE` pieces.
    """
    import pydoc_data.topics

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = "\n".join(pydoc_data.topics.topics.values())[:60_000]
    # ASCII only keeps the required characters few; anything else goes through byte fallback
    lines = text.encode("ascii", "ignore").decode().splitlines()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(directory / "tokenizer"),
        vocab_size=TINY_VOCAB_SIZE,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",  # as Llama's tokenizer
        remove_extra_whitespaces=False,
        split_digits=True,
        num_threads=1,
        minloglevel=2,
    )
    (directory / "tokenizer.vocab").unlink()
    tokenizer = LlamaTokenizer.from_pretrained(str(directory), local_files_only=True)
    if len(tokenizer) != TINY_VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, expected {TINY_VOCAB_SIZE}")
    tokenizer.save_pretrained(str(directory))
    return directory


def copy_tokenizer(
    tokenizer_dir: Path, directory: Path, files: tuple[str, ...] = TOKENIZER_FILES
) -> None:
    for name in files:
        shutil.copy(Path(tokenizer_dir) / name, Path(directory) / name)


def random_llama(config: LlamaConfig, *, seed: int) -> LlamaForCausalLM:
    """A random-init float32 ``LlamaForCausalLM`` in eval mode, with eager attention.

    RMSNorm weights are drawn from U(0.5, 1.5) instead of HF's all-ones so that folding them into
    the next weights (``fold_ln``) is actually exercised.
    """
    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    model.requires_grad_(False)
    return model


def write_hf_checkpoint(
    directory: Path,
    config: LlamaConfig,
    *,
    seed: int,
    tokenizer_dir: Path,
    fmt: Format = "safetensors",
) -> LlamaForCausalLM:
    """Write a random ``LlamaForCausalLM`` + tokenizer as a Hugging Face directory; return it.

    ``fmt``: ``"safetensors"`` (one ``model.safetensors``), ``"sharded"`` (several safetensors
    shards + ``model.safetensors.index.json``) or ``"bin"`` (``pytorch_model.bin`` written with
    ``torch.save``; tied ``lm_head.weight`` left out as transformers does).
    """
    if fmt not in get_args(Format):
        raise ValueError(f"unknown fmt {fmt!r}; valid: {', '.join(get_args(Format))}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = random_llama(config, seed=seed)
    if fmt == "bin":
        model.config.save_pretrained(str(directory))
        state = {k: v.clone() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight")
        torch.save(state, directory / "pytorch_model.bin")
    else:
        shard_size = "20KB" if fmt == "sharded" else "1GB"
        model.save_pretrained(str(directory), max_shard_size=shard_size)
    copy_tokenizer(tokenizer_dir, directory)
    if fmt == "sharded" and not (directory / "model.safetensors.index.json").is_file():
        raise RuntimeError("save_pretrained wrote a single file; lower max_shard_size")
    return model


# ---- Meta layout ------------------------------------------------------------------------------

# Meta tensor name -> dim along which fairscale splits it across model-parallel ranks
# (ColumnParallelLinear: 0, RowParallelLinear: 1, ParallelEmbedding: 1, None: replicated).
META_SPLIT = {
    "tok_embeddings.weight": 1,
    "norm.weight": None,
    "output.weight": 0,
    "rope.freqs": None,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w2.weight": 1,
    "feed_forward.w3.weight": 0,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
}


def to_adjacent_pairs(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half row order -> Meta adjacent-pair row order, inside every head.

    HF row ``i`` (first half) pairs with row ``i + d_head/2``; Meta keeps that pair at rows
    ``2i, 2i+1``. So Meta row ``2i`` is HF row ``i``, Meta row ``2i+1`` is HF row ``i + d_head/2``.
    """
    rows, cols = weight.shape
    d_head = rows // n_heads
    meta = torch.empty_like(weight)
    for head in range(n_heads):
        hf_head = weight[head * d_head : (head + 1) * d_head]
        for i in range(d_head // 2):
            meta[head * d_head + 2 * i] = hf_head[i]
            meta[head * d_head + 2 * i + 1] = hf_head[i + d_head // 2]
    return meta


def meta_state_dict(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The full (unsharded) Meta-named state dict of an HF Llama model."""
    cfg = model.config
    sd = model.state_dict()
    d_head = cfg.hidden_size // cfg.num_attention_heads
    meta = {
        "tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],  # tied models: same values as the embedding
        "rope.freqs": 1.0
        / cfg.rope_parameters["rope_theta"] ** (torch.arange(0, d_head, 2).float() / d_head),
    }
    for layer in range(cfg.num_hidden_layers):
        h, m = f"model.layers.{layer}.", f"layers.{layer}."
        meta |= {
            m + "attention.wq.weight": to_adjacent_pairs(
                sd[h + "self_attn.q_proj.weight"], cfg.num_attention_heads
            ),
            m + "attention.wk.weight": to_adjacent_pairs(
                sd[h + "self_attn.k_proj.weight"], cfg.num_key_value_heads
            ),
            m + "attention.wv.weight": sd[h + "self_attn.v_proj.weight"],
            m + "attention.wo.weight": sd[h + "self_attn.o_proj.weight"],
            m + "feed_forward.w1.weight": sd[h + "mlp.gate_proj.weight"],
            m + "feed_forward.w2.weight": sd[h + "mlp.down_proj.weight"],
            m + "feed_forward.w3.weight": sd[h + "mlp.up_proj.weight"],
            m + "attention_norm.weight": sd[h + "input_layernorm.weight"],
            m + "ffn_norm.weight": sd[h + "post_attention_layernorm.weight"],
        }
    return meta


def meta_params(config: LlamaConfig) -> dict:
    """``params.json`` as Meta writes it for Llama 2 (vocab_size -1; n_kv_heads only under GQA)."""
    dim = config.hidden_size
    # Meta's FeedForward: hidden = multiple_of * ceil(int(multiplier * int(2 * 4 * dim / 3)) / m)
    base = int(2 * 4 * dim / 3)
    params = {
        "dim": dim,
        "multiple_of": 4,
        "ffn_dim_multiplier": config.intermediate_size / base,
        "n_heads": config.num_attention_heads,
        "n_layers": config.num_hidden_layers,
        "norm_eps": config.rms_norm_eps,
        "vocab_size": -1,
    }
    if config.num_key_value_heads != config.num_attention_heads:
        params["n_kv_heads"] = config.num_key_value_heads
    if config.rope_parameters["rope_theta"] != 10000.0:
        params["rope_theta"] = config.rope_parameters["rope_theta"]
    return params


def write_meta_checkpoint(
    directory: Path, model: LlamaForCausalLM, *, tokenizer_dir: Path, n_shards: int = 2
) -> Path:
    """Write ``model`` in Meta's layout: params.json, consolidated.00..NN.pth, tokenizer.model."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    full = meta_state_dict(model)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for name, tensor in full.items():
        suffix = name.split(".", 2)[2] if name.startswith("layers.") else name
        dim = META_SPLIT[suffix]
        if dim is None:
            pieces = [tensor.clone() for _ in range(n_shards)]
        else:
            if tensor.shape[dim] % n_shards:
                raise ValueError(f"{name} {tuple(tensor.shape)} does not split into {n_shards}")
            pieces = [p.clone() for p in tensor.chunk(n_shards, dim=dim)]
        for shard, piece in zip(shards, pieces, strict=True):
            shard[name] = piece
    for index, shard in enumerate(shards):
        torch.save(shard, directory / f"consolidated.{index:02d}.pth")
    (directory / "params.json").write_text(json.dumps(meta_params(model.config)))
    copy_tokenizer(tokenizer_dir, directory, files=("tokenizer.model",))
    return directory


def load_reference(directory: Path) -> LlamaForCausalLM:
    """Load an HF directory with plain transformers (eager attention, float32): the reference."""
    model = LlamaForCausalLM.from_pretrained(
        str(directory), attn_implementation="eager", dtype=torch.float32, local_files_only=True
    )
    return model.eval()
