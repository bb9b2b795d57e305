"""Read a llama.cpp GGUF file as a checked, dequantized transformers ``LlamaForCausalLM``.

    >>> {"Q4_K", "Q8_0", "F16"} <= set(supported_tensor_types())   # what this gguf can dequantize
    True

``read_gguf_checkpoint(path)`` takes a ``.gguf`` file (``"~/models/llama-2-7b.Q4_K_M.gguf"``) or a
directory holding exactly one, and returns ``(LlamaForCausalLM, tokenizer)``;
``lens_attn.load_model(path)`` does the same and goes on to TransformerLens.

The file's header is read by :mod:`lens_attn.loading.gguf_file` (metadata and tensor table, the
tensors memory-mapped). The GGUF metadata becomes a Llama ``config.json``-style dict that goes
through the same ``check_llama_config`` as a Hugging Face directory; every tensor is dequantized by the ``gguf``
package (the code transformers' own GGUF loader calls), cast to the requested dtype, renamed from
llama.cpp's names (``blk.N.attn_q.weight``) to transformers' and, for q and k, permuted back from
GGML's adjacent-pair rotary order to transformers' rotate-half order. The model is a plain
``LlamaForCausalLM`` built from that config, with no ``quantization_config``, so it goes through
``lens_attn.loading``'s checked route like any other source. The tokenizer is transformers' reading
of the GGUF vocabulary (the class ``AutoTokenizer.from_pretrained(dir, gguf_file=name)`` gives).

Refused with a ValueError naming the file: a file that is not GGUF or is truncated, an
architecture other than ``llama``, a tensor type the installed ``gguf`` package cannot dequantize
(:func:`supported_tensor_types` lists the valid ones), mixture-of-experts and rope-scaled files.
"""

import functools
import os
from pathlib import Path

import torch
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from lens_attn.loading.gguf_file import GGUFFile, GGUFFormatError, NotGGUFError, read_gguf_file
from lens_attn.loading.hf import (
    _WITH_BOS,
    _check_state_shapes,
    _check_tokenizer_vocab,
    _llama_from_pretrained,
    _quiet_transformers,
    check_llama_config,
    resolve_dtype,
)
from lens_attn.loading.readers import CheckpointReader, release_pages

# llama.cpp per-layer tensor name -> transformers name (blk.N.<key> -> model.layers.N.<value>)
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def find_gguf_file(path: str | os.PathLike) -> Path | None:
    """The GGUF file ``path`` names: itself if it ends in ``.gguf``, or the one ``.gguf`` in a
    directory without ``config.json`` / ``params.json``; None if ``path`` is not a GGUF source.

    A directory holding several ``.gguf`` files (and no config) is ambiguous: ValueError listing them.
    """
    path = Path(path).expanduser()
    if path.suffix.lower() == ".gguf" and not path.is_dir():
        return path
    if not path.is_dir() or (path / "config.json").exists() or (path / "params.json").exists():
        return None
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(files) > 1:
        raise ValueError(
            f"{path} holds {len(files)} GGUF files ({', '.join(p.name for p in files)}); "
            "pass the path of the one to load"
        )
    return files[0] if files else None


@functools.cache
def supported_tensor_types() -> tuple[str, ...]:
    """GGML tensor types the installed ``gguf`` package dequantizes (what transformers can read).

    Found by dequantizing one block of zeros of every type, so the list follows the installed
    version (gguf 0.19: F32, F16, BF16, Q4_0 ... Q8_0, the K-quants Q2_K ... Q6_K, the IQ types).
    """
    import gguf
    import numpy as np

    valid = []
    for qtype in gguf.GGMLQuantizationType:
        sizes = gguf.GGML_QUANT_SIZES.get(qtype)
        if sizes is None or qtype.name.startswith("I") and qtype.name[1:].isdigit():
            continue  # integer tensors are not weights
        block_size, type_size = sizes
        try:
            out = gguf.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
        except (NotImplementedError, ValueError, TypeError, AssertionError):
            continue
        if out.size == block_size or qtype.name in ("F32", "F16"):
            valid.append(qtype.name)
    return tuple(valid)


def _read_header(file: Path) -> GGUFFile:
    """The metadata and tensor table of ``file``, or one ValueError if it is not a complete GGUF
    file."""
    if not file.is_file():
        raise FileNotFoundError(f"no such GGUF file: {file.absolute()}")
    try:
        return read_gguf_file(file)
    except NotGGUFError as err:
        raise ValueError(
            f"{file} is not a GGUF file: {err}. "
            "lens-attn reads .gguf files written by llama.cpp / the gguf package"
        ) from None
    except GGUFFormatError as err:
        raise ValueError(
            f"{file} is not a readable GGUF file (truncated or corrupt?): {err}"
        ) from None


def gguf_config(header: GGUFFile, *, source: str) -> dict:
    """The ``config.json``-style dict of a llama GGUF file, checked by ``check_llama_config``."""
    architecture = header.fields.get("general.architecture")
    if architecture != "llama":
        raise ValueError(
            f"{source}: general.architecture is {architecture!r}; lens-attn loads GGUF files "
            "of architecture 'llama' (Llama 2, Llama 3, Code Llama, SmolLM, TinyLlama)"
        )
    tensor_names = {t.name for t in header.tensors}
    if header.fields.get("llama.expert_count") or any("_exps." in n for n in tensor_names):
        raise ValueError(
            f"{source} is a mixture-of-experts model (Mixtral), which is not supported"
        )
    scaling = header.fields.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in tensor_names:
        kind = scaling if scaling not in ("none", None) else "llama3 (a rope_freqs.weight tensor)"
        raise ValueError(
            f"{source}: rope scaling of type {kind} is not supported for GGUF files; valid: "
            "none (plain rotary embeddings). A Llama 3.x Hugging Face directory with rope_scaling "
            "type 'llama3' loads"
        )

    def required(key: str):
        value = header.fields.get(f"llama.{key}")
        if value is None:
            raise ValueError(f"{source} has no llama.{key} in its metadata; is it complete?")
        return value

    n_heads = required("attention.head_count")
    n_kv_heads = header.fields.get("llama.attention.head_count_kv", n_heads)
    if not isinstance(n_kv_heads, int):
        raise ValueError(f"{source}: per-layer head counts {n_kv_heads} are not supported")
    d_model = required("embedding_length")
    d_head = d_model // n_heads if n_heads else 0
    rotary = header.fields.get("llama.rope.dimension_count", d_head)
    if rotary != d_head:
        raise ValueError(
            f"{source}: llama.rope.dimension_count {rotary} rotates part of each head; valid: "
            f"the whole head, {d_head}"
        )
    tokens = header.fields.get("tokenizer.ggml.tokens")
    embed = next((t for t in header.tensors if t.name == "token_embd.weight"), None)
    vocab = header.fields.get("llama.vocab_size") or (
        int(embed.shape[-1]) if embed is not None else len(tokens or [])
    )
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": d_model,
        "intermediate_size": required("feed_forward_length"),
        "num_hidden_layers": required("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": d_head,
        "vocab_size": vocab,
        "max_position_embeddings": required("context_length"),
        "rms_norm_eps": float(header.fields.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": float(header.fields.get("llama.rope.freq_base", 10000.0)),
        },
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu",
        "bos_token_id": header.fields.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": header.fields.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": header.fields.get("tokenizer.ggml.padding_token_id"),
    }


def _hf_name(name: str, *, source: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise ValueError(
        f"{source} has a tensor {name!r} that a Llama model does not use (biases and other extra "
        "weights are refused, not ignored)"
    )


def from_ggml_order(weight: Tensor, n_head: int) -> Tensor:
    """Undo llama.cpp's q/k permutation: GGML adjacent-pair rows -> HF rotate-half rows per head.

    llama.cpp wrote ``w.reshape(n_head, 2, d_head // 2, d_in).swapaxes(1, 2)``; this swaps back.
    """
    half = weight.shape[0] // n_head // 2
    pairs = weight.reshape(n_head, half, 2, *weight.shape[1:])  # (head, d_head/2, 2, d_in)
    halves = pairs.transpose(1, 2)  # (head, 2, d_head/2, d_in): first halves, then second halves
    return halves.reshape(weight.shape)


def gguf_state_dict(
    header: GGUFFile, config: LlamaConfig, *, dtype: torch.dtype, source: str
) -> dict:
    """Dequantize every tensor to ``dtype`` under its transformers name (q/k rows un-permuted)."""
    reader = GGUFReader(header, config, source=source)
    return {name: reader.read(name, dtype) for name in reader.shapes}


class GGUFReader(CheckpointReader):
    """A checked GGUF file whose tensors are dequantized one at a time, straight into ``dtype``.

    Opening checks every tensor's name, shape and type (nothing is dequantized yet). Reading
    dequantizes a tensor a block of rows at a time (at most :data:`CHUNK_ELEMENTS` values in
    float32 in flight) into a tensor of the target dtype, un-permutes q/k rows, and releases the
    file's pages it read.
    """

    CHUNK_ELEMENTS = 1 << 22

    def __init__(self, header: GGUFFile, config: LlamaConfig, *, source: str) -> None:
        self.header, self.config, self.source = header, config, source
        valid = supported_tensor_types()
        self._tensors = {_hf_name(t.name, source=source): t for t in header.tensors}
        self.shapes = {
            name: tuple(int(d) for d in reversed(t.shape)) for name, t in self._tensors.items()
        }
        _check_state_shapes(self.shapes, config, source=source)
        for tensor in header.tensors:
            if tensor.tensor_type.name not in valid:
                raise ValueError(
                    f"{source}: tensor {tensor.name} has type {tensor.tensor_type.name}, which "
                    f"the installed gguf package cannot dequantize; valid: {', '.join(valid)}"
                )

    def _read(self, name: str, dtype: torch.dtype) -> Tensor:
        import gguf
        import numpy as np

        tensor, shape = self._tensors[name], self.shapes[name]
        n_rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
        raw = tensor.data.reshape(n_rows, -1)  # one row of values per row of bytes
        out = torch.empty(n_rows, shape[-1], dtype=dtype)
        step = max(1, self.CHUNK_ELEMENTS // shape[-1])
        for start in range(0, n_rows, step):
            values = gguf.dequantize(raw[start : start + step], tensor.tensor_type)
            out[start : start + step] = torch.from_numpy(np.require(values, np.float32, ["W"]))
        release_pages(tensor.data.ctypes.data, tensor.data.nbytes)
        weight = out.reshape(shape)
        if name.endswith("q_proj.weight"):
            weight = from_ggml_order(weight, self.config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weight = from_ggml_order(weight, self.config.num_key_value_heads)
        return weight.contiguous()


def open_gguf(
    path: str | os.PathLike, *, tokenizer: PreTrainedTokenizerBase | None = None
) -> tuple[GGUFReader, PreTrainedTokenizerBase]:
    """Check a GGUF file (or the directory holding one) and open it for reading tensor by tensor.

    Returns the reader and the tokenizer (``tokenizer`` if given, else the file's vocabulary).
    """
    file = find_gguf_file(path)
    if file is None:
        raise ValueError(f"{path} is neither a .gguf file nor a directory holding one")
    source = str(file)
    header = _read_header(file)
    raw = gguf_config(header, source=source)
    check_llama_config(raw, source=f"{source} metadata")
    config = LlamaConfig.from_dict(raw)
    reader = GGUFReader(header, config, source=source)
    tokenizer = tokenizer if tokenizer is not None else gguf_tokenizer(file)
    _check_tokenizer_vocab(tokenizer, config.vocab_size, source=source)
    return reader, tokenizer


def gguf_tokenizer(file: Path) -> PreTrainedTokenizerBase:
    """transformers' tokenizer for the vocabulary stored in ``file``'s metadata.

    The class ``AutoTokenizer.from_pretrained(dir, gguf_file=name)`` gives a llama file
    (transformers 5: ``TokenizersBackend``, alias ``PreTrainedTokenizerFast``), built directly:
    ``AutoTokenizer`` first parses the whole file's metadata again to learn the model type it
    already knows (4 of its 5 s on SmolLM2-135M).
    """
    from transformers import PreTrainedTokenizerFast

    try:
        with _quiet_transformers():
            return PreTrainedTokenizerFast.from_pretrained(
                str(file.parent), gguf_file=file.name, local_files_only=True, **_WITH_BOS
            )
    except Exception as err:  # a missing or unconvertible vocabulary fails in many ways
        raise ValueError(
            f"transformers could not read the tokenizer stored in {file}: {type(err).__name__}: "
            f"{err}; pass tokenizer=... to use another"
        ) from None


def read_gguf_checkpoint(
    path: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """Read a llama GGUF file (or a directory holding one) as a dequantized ``LlamaForCausalLM``.

    Tensors are dequantized one at a time straight into ``dtype`` (default float32), so the
    peak is about the model in ``dtype``. The model uses eager attention and is in eval mode;
    ``tokenizer`` replaces the one stored in the file. With a ``device_map`` (a bridge over several
    GPUs) transformers places the dequantized weights.
    """
    from lens_attn.loading import stream

    torch_dtype = resolve_dtype(dtype)
    reader, tokenizer = open_gguf(path, tokenizer=tokenizer)
    if device_map is None:
        return stream.hf_model_from_reader(reader, dtype=torch_dtype), tokenizer
    state = gguf_state_dict(reader.header, reader.config, dtype=torch_dtype, source=reader.source)
    model = _llama_from_pretrained(
        None,
        reader.config,
        dtype=torch_dtype,
        state_dict=state,
        device_map=device_map,
        max_memory=max_memory,
    )
    return model, tokenizer
