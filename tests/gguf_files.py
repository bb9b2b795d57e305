"""Write GGUF files the way llama.cpp's ``convert_hf_to_gguf.py`` does, for the GGUF loading tests.

Written from llama.cpp's conventions, not from lens-attn's reader: tensor names ``token_embd``,
``blk.N.attn_q`` ..., ggml's reversed shape order (handled by ``gguf.GGUFWriter``), and q/k rows
permuted from Hugging Face's rotate-half order to GGML's adjacent pairs
(``LlamaModel.permute``: ``reshape(n_head, 2, d_head // 2, ...).swapaxes(1, 2)``). The tokenizer is
the tiny SentencePiece model of ``checkpoints.train_tiny_tokenizer`` stored as a ``llama`` vocab
(pieces, scores, token types), as llama.cpp stores Llama 2's.

``GGUF_CONFIG`` is a small Llama with GQA whose sizes are multiples of 32 (the block size of Q8_0 /
Q4_0 rows) but otherwise distinct: d_model 96, 6 query heads sharing 2 key/value heads, d_head 16,
d_mlp 160, 3 layers, vocab 400.
"""

from pathlib import Path

import numpy as np
import torch
from checkpoints import TINY_VOCAB_SIZE
from transformers import LlamaConfig, LlamaForCausalLM

# HF name suffix -> GGUF name suffix, per layer
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_config(**changes) -> LlamaConfig:
    fields = dict(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
        tie_word_embeddings=False,
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    return LlamaConfig(**(fields | changes))


def to_ggml_order(weight: torch.Tensor, n_head: int) -> np.ndarray:
    """llama.cpp ``LlamaModel.permute``: HF rotate-half rows -> GGML adjacent-pair rows per head."""
    w = weight.numpy()
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_tensors(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array for every tensor llama.cpp writes for ``model``."""
    cfg = model.config
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    out = {
        "token_embd.weight": sd["model.embed_tokens.weight"].numpy(),
        "output_norm.weight": sd["model.norm.weight"].numpy(),
    }
    if not cfg.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"].numpy()
    for layer in range(cfg.num_hidden_layers):
        for hf, gg in LAYER_NAMES.items():
            w = sd[f"model.layers.{layer}.{hf}"]
            if hf == "self_attn.q_proj.weight":
                arr = to_ggml_order(w, cfg.num_attention_heads)
            elif hf == "self_attn.k_proj.weight":
                arr = to_ggml_order(w, cfg.num_key_value_heads)
            else:
                arr = w.numpy()
            out[f"blk.{layer}.{gg}"] = arr
    return out


def add_sentencepiece_vocab(writer, tokenizer_model: Path) -> None:
    """The tokenizer as llama.cpp stores a SentencePiece vocab (``tokenizer.ggml.model = llama``)."""
    import gguf
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode())
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)


def write_gguf(
    path: Path,
    model: LlamaForCausalLM,
    *,
    tokenizer_model: Path | None,
    tensor_type: str = "F32",
    architecture: str = "llama",
    raw_override: dict[str, tuple[np.ndarray, str]] | None = None,
    extra_metadata: dict[str, float | int | str] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write ``model`` as a GGUF file; 2-D weights in ``tensor_type``, norms in F32 as llama.cpp does.

    ``raw_override``: GGUF name -> (bytes as uint8 array, type name) written verbatim instead
    (for types the gguf package cannot quantize to). ``extra_metadata``: more ``llama.*`` keys.
    ``extra_tensors``: more F32 tensors (e.g. llama.cpp's ``rope_freqs.weight`` for Llama 3.1).
    """
    import gguf

    qtype = gguf.GGMLQuantizationType[tensor_type]
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny test llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    for key, value in (extra_metadata or {}).items():
        if isinstance(value, str):
            writer.add_string(f"{architecture}.{key}", value)
        elif isinstance(value, float):
            writer.add_float32(f"{architecture}.{key}", value)
        else:
            writer.add_uint32(f"{architecture}.{key}", value)
    if tokenizer_model is not None:  # None: a file without tokenizer metadata
        add_sentencepiece_vocab(writer, tokenizer_model)
    for name, array in (extra_tensors or {}).items():
        writer.add_tensor(name, array.astype(np.float32))
    for name, array in gguf_tensors(model).items():
        if raw_override and name in raw_override:
            raw, raw_type = raw_override[name]
            writer.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType[raw_type])
            continue
        if array.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, array.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
