"""Read a local Llama 2 checkpoint directory as a checked transformers ``LlamaForCausalLM``.

    >>> hf_model, tokenizer = read_llama_checkpoint(lens_attn.BUNDLED_CHECKPOINT)  # HF or Meta layout
    >>> type(hf_model).__name__, hf_model.config.num_hidden_layers
    ('LlamaForCausalLM', 4)

Every ``config.json`` field that changes the maths is checked (``check_llama_config``), and every
tensor shape before any weight is read, so an unsupported or inconsistent checkpoint raises
instead of loading wrongly. ``lens_attn.loading`` turns the result into a ``HookedTransformer`` or a
``TransformerBridge``. Nothing here touches the network.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from lens_attn.errors import ConfigError

if TYPE_CHECKING:
    from lens_attn.loading.readers import CheckpointReader
from lens_attn.loading import meta, rope
from lens_attn.validation import (
    config_float,
    config_int,
    reading_checkpoint,
)

DTypeName = Literal["float32", "bfloat16", "float16"]
_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in get_args(DTypeName)}

# Llama prepends BOS. Saying so explicitly also stops TransformerLens's get_tokenizer_with_bos from
# re-loading the tokenizer by its name_or_path, which for a hub name ignores our cache_dir.
_WITH_BOS = {"add_bos_token": True}

# Older transformers saved the rotary ``inv_freq`` buffer; it is recomputed from rope_theta on load.
_DERIVED_BUFFER_SUFFIX = "rotary_emb.inv_freq"


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``None`` -> float32; ``"bfloat16"`` / ``torch.bfloat16`` etc.; anything else: ValueError."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(
        f"unknown dtype {dtype!r}; valid: {', '.join(get_args(DTypeName))} "
        "(as strings or torch dtypes), or None for float32"
    )


def _existing_dir(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"no such directory: {path.absolute()}")
    if not path.is_dir():
        raise NotADirectoryError(
            f"expected a checkpoint directory, got a file: {path}; pass the directory that holds "
            "config.json (Hugging Face) or params.json (Meta)"
        )
    return path


def read_llama_checkpoint(
    directory: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """Read a local Hugging Face or Meta-layout Llama directory as a checked transformers model.

    Every config field and tensor shape is checked before loading (see :func:`check_llama_config`),
    so an unsupported or inconsistent checkpoint raises instead of loading wrongly. The model uses
    eager attention (what ``TransformerBridge`` hooks need) and is in eval mode on the CPU, its
    weights read one tensor at a time (:mod:`lens_attn.loading.stream`), unless ``device_map`` is
    given (Hugging Face directories only): then transformers' ``from_pretrained`` places them.
    """
    from lens_attn.loading import stream

    path = _existing_dir(Path(directory).expanduser())
    torch_dtype = resolve_dtype(dtype)
    if device_map is not None:
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{path} is in Meta's layout, which cannot be loaded with a device_map; convert "
                "it once with lens_attn.loading.meta.convert_meta_to_hf(meta_dir, out_dir) and "
                "load out_dir"
            )
        reader, tokenizer = open_llama_directory(path, tokenizer=tokenizer)
        reader.close()  # only the checks: transformers reads the weights itself
        with reading_checkpoint(path):
            model = _llama_from_pretrained(
                str(path), reader.config, dtype=torch_dtype, device_map=device_map,
                max_memory=max_memory,
            )  # fmt: skip
        return model, tokenizer
    reader, tokenizer = open_llama_directory(path, tokenizer=tokenizer)
    with reader:
        return stream.hf_model_from_reader(reader, dtype=torch_dtype), tokenizer


def open_llama_directory(
    directory: str | os.PathLike, *, tokenizer: PreTrainedTokenizerBase | None = None
) -> "tuple[CheckpointReader, PreTrainedTokenizerBase]":
    """Check a Hugging Face or Meta-layout directory and open its weights for reading.

    Config, tensor shapes and the tokenizer's size are checked here, from the files' headers,
    before any weight is read. Returns the reader (close it, or use it as a context manager) and
    the tokenizer (``tokenizer`` if given, else the checkpoint's).
    """
    from lens_attn.loading.readers import HFReader

    path = _existing_dir(Path(directory).expanduser())
    if (path / "config.json").is_file():
        raw = meta.read_json_object(path / "config.json")
        check_llama_config(raw, source=str(path / "config.json"))
        config = LlamaConfig.from_dict(raw)
        files, shapes = _hf_weight_files(path)
        _check_state_shapes(shapes, config, source=str(path))
        tokenizer = tokenizer if tokenizer is not None else _hf_tokenizer(path)
        _check_tokenizer_vocab(tokenizer, config.vocab_size, source=str(path))
        with reading_checkpoint(path):
            return HFReader(path, config, files), tokenizer
    if meta.is_meta_checkpoint(path):
        reader = meta.MetaReader(path)
        try:
            config = reader.config
            _check_state_shapes(reader.shapes, config, source=str(path))
            if tokenizer is None:
                tokenizer_model = meta.find_meta_tokenizer(path)
                if tokenizer_model is None:
                    raise FileNotFoundError(
                        f"no tokenizer.model in {path} or its parent; Meta ships it next to the "
                        "model directories. Pass tokenizer=... to use another"
                    )
                tokenizer = _sentencepiece_tokenizer(tokenizer_model)
            _check_tokenizer_vocab(tokenizer, config.vocab_size, source=str(path))
        except BaseException:
            reader.close()
            raise
        return reader, tokenizer
    present = sorted(p.name for p in path.iterdir())[:12]
    raise ValueError(
        f"not a Llama checkpoint: {path} has neither config.json (Hugging Face layout), "
        f"params.json (Meta layout) nor a .gguf file; it holds {present or 'nothing'}"
    )


def check_llama_config(raw: dict, *, source: str = "config.json") -> None:
    """Refuse a Hugging Face ``config.json`` that is not a plain Llama 2 architecture.

    Refused (ValueError naming the field): ``model_type`` other than ``llama`` or
    ``architectures`` other than ``["LlamaForCausalLM"]``; ``hidden_act`` other than silu;
    ``attention_bias`` or ``mlp_bias`` true; ``rope_scaling`` / ``rope_parameters`` of a type other
    than default or ``llama3`` (Llama 3.1+, see :mod:`lens_attn.loading.rope`); ``head_dim`` other than
    ``hidden_size // num_attention_heads``; heads that do not divide; ``quantization_config``.
    ``pretraining_tp > 1`` is accepted: it only split the matmuls in old transformers' forward,
    which is mathematically the same (transformers 5 ignores it).
    """
    model_type = raw.get("model_type")
    architectures = raw.get("architectures") or ["LlamaForCausalLM"]
    if model_type != "llama" or architectures != ["LlamaForCausalLM"]:
        raise ValueError(
            f"not a Llama checkpoint: model_type {model_type!r}, architectures "
            f"{raw.get('architectures')} in {source}; lens-attn loads model_type 'llama' with "
            "architectures ['LlamaForCausalLM'] (Llama 2, Code Llama)"
        )
    required = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
    )
    missing = [key for key in required if key not in raw]
    if missing:
        raise ConfigError(f"{source} is missing {missing}; a Llama config.json needs {required}")
    _check_config_types(raw, required, source=source)
    if raw.get("quantization_config"):
        raise ValueError(f"{source} is a quantized checkpoint, which lens-attn does not load")
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(
            f"{source}: hidden_act {raw['hidden_act']!r} is not supported; valid: silu"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if raw.get(flag):
            raise ValueError(f"{source}: {flag}=true is not supported (Llama 2 has no biases)")
    for key in ("rope_scaling", "rope_parameters"):
        rope.check_rope(raw.get(key), key=key, source=source)
    d_model, n_heads = raw["hidden_size"], raw["num_attention_heads"]
    n_kv_heads = raw.get("num_key_value_heads") or n_heads
    if d_model % n_heads != 0:
        raise ValueError(f"{source}: hidden_size {d_model} is not divisible by {n_heads} heads")
    head_dim = raw.get("head_dim") or d_model // n_heads
    if head_dim != d_model // n_heads:
        raise ValueError(
            f"{source}: head_dim {head_dim} is inconsistent with hidden_size / "
            f"num_attention_heads = {d_model} / {n_heads}; valid: {d_model // n_heads}"
        )
    if head_dim % 2:
        raise ValueError(f"{source}: head_dim {head_dim} must be even for rotary embeddings")
    if n_heads % n_kv_heads:
        raise ValueError(
            f"{source}: num_attention_heads {n_heads} is not a multiple of num_key_value_heads "
            f"{n_kv_heads}"
        )


def _check_config_types(raw: dict, required: tuple[str, ...], *, source: str) -> None:
    """Sizes are positive JSON integers; eps and rope theta positive finite numbers (ConfigError)."""
    for key in required:
        config_int(raw, key, source=source)
    for key in ("num_key_value_heads", "head_dim", "max_position_embeddings"):
        config_int(raw, key, source=source, optional=True)
    for key in ("rms_norm_eps", "rope_theta"):
        config_float(raw, key, source=source, optional=True)
    rope = raw.get("rope_parameters")
    if isinstance(rope, dict):
        config_float(rope, "rope_theta", source=f"{source}: rope_parameters", optional=True)


def _expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    d_model, d_mlp, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    d_head = d_model // config.num_attention_heads
    q_rows = config.num_attention_heads * d_head
    kv_rows = config.num_key_value_heads * d_head
    shapes = {"model.embed_tokens.weight": (vocab, d_model), "model.norm.weight": (d_model,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab, d_model)
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "input_layernorm.weight": (d_model,),
            p + "post_attention_layernorm.weight": (d_model,),
            p + "self_attn.q_proj.weight": (q_rows, d_model),
            p + "self_attn.k_proj.weight": (kv_rows, d_model),
            p + "self_attn.v_proj.weight": (kv_rows, d_model),
            p + "self_attn.o_proj.weight": (d_model, q_rows),
            p + "mlp.gate_proj.weight": (d_mlp, d_model),
            p + "mlp.up_proj.weight": (d_mlp, d_model),
            p + "mlp.down_proj.weight": (d_model, d_mlp),
        }
    return shapes


def _check_state_shapes(
    shapes: dict[str, tuple[int, ...]], config: LlamaConfig, *, source: str
) -> None:
    expected = _expected_shapes(config)
    embed = shapes.get("model.embed_tokens.weight")
    if embed is not None and embed[0] != config.vocab_size:
        raise ValueError(
            f"{source}: the config says vocab_size={config.vocab_size} but "
            f"model.embed_tokens.weight has {embed[0]} rows; fix vocab_size in config.json"
        )
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise ValueError(f"{source} is missing {len(missing)} weight tensors, e.g. {missing[:4]}")
    allowed_extra = {"lm_head.weight"} if config.tie_word_embeddings else set()
    unexpected = sorted(
        name
        for name in set(shapes) - set(expected) - allowed_extra
        if not name.endswith(_DERIVED_BUFFER_SUFFIX)
    )
    if unexpected:
        raise ValueError(
            f"{source} has tensors a Llama 2 model does not use, e.g. {unexpected[:4]} "
            "(biases and other extra weights are refused, not ignored)"
        )
    expected |= {"lm_head.weight": (config.vocab_size, config.hidden_size)}
    for name, shape in shapes.items():
        if name in expected and tuple(shape) != expected[name]:
            raise ValueError(
                f"{source}: {name} has shape {tuple(shape)} but the config implies {expected[name]}"
            )


def _hf_weight_files(path: Path) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """The weight files of a HF directory and every tensor's shape, read without the data."""
    for index_name, single_name in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if (path / index_name).is_file():
            weight_map = meta.read_json_object(path / index_name).get("weight_map", {})
            files = sorted(set(weight_map.values()))
            missing = [name for name in files if not (path / name).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{path} is incomplete: {index_name} lists {missing} but they are missing"
                )
        elif (path / single_name).is_file():
            files = [single_name]
        else:
            continue
        shapes: dict[str, tuple[int, ...]] = {}
        for name in files:
            shapes |= _file_shapes(path / name)
        return files, shapes
    present = sorted(p.name for p in path.iterdir())[:12]
    raise FileNotFoundError(
        f"no weights in {path}: expected model.safetensors, model.safetensors.index.json with "
        "its shards, pytorch_model.bin, or pytorch_model.bin.index.json with its shards; "
        f"found {present}"
    )


def _file_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    with reading_checkpoint(file):  # corrupt, truncated or unsafe files: CheckpointError
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as handle:
                return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        return {k: tuple(v.shape) for k, v in state.items()}


def _hf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        raise FileNotFoundError(
            f"no tokenizer in {path}: expected tokenizer.json and/or tokenizer.model "
            "(SentencePiece); pass tokenizer=... to use another"
        )
    from transformers import AutoTokenizer

    with _quiet_transformers():
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, **_WITH_BOS)


def _sentencepiece_tokenizer(tokenizer_model: Path) -> PreTrainedTokenizerBase:
    """A transformers Llama tokenizer from a bare SentencePiece ``tokenizer.model``."""
    from transformers import LlamaTokenizer

    # transformers 5's LlamaTokenizer is the fast (tokenizers) one; from_pretrained converts
    # tokenizer.model with SentencePiece when there is no tokenizer.json.
    with _quiet_transformers():
        return LlamaTokenizer.from_pretrained(
            str(tokenizer_model.parent), local_files_only=True, **_WITH_BOS
        )


def _check_tokenizer_vocab(tokenizer: PreTrainedTokenizerBase, n_rows: int, *, source: str) -> None:
    """A tokenizer larger than the embedding would produce ids past its last row: refused.

    A smaller one is fine (its ids are all valid): Llama checkpoints may pad the embedding
    (e.g. to a multiple of 64), and the extra rows are simply never used.
    """
    n_tokens = len(tokenizer)
    if n_tokens > n_rows:
        raise ValueError(
            f"tokenizer vocab size mismatch for {source}: the tokenizer has {n_tokens} tokens but "
            f"the embedding has {n_rows} rows, so ids {n_rows}..{n_tokens - 1} have no embedding. "
            f"Use the tokenizer saved with these weights (at most {n_rows} tokens)"
        )


def _llama_from_pretrained(
    path: str | None,
    config: LlamaConfig,
    *,
    dtype: torch.dtype,
    state_dict: dict[str, Tensor] | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
) -> LlamaForCausalLM:
    kwargs: dict[str, Any] = dict(
        config=config,
        dtype=dtype,
        attn_implementation="eager",  # TransformerBridge hooks need the eager attention path
        output_loading_info=True,
        local_files_only=True,
    )
    if state_dict is not None:
        kwargs["state_dict"] = state_dict
    if device_map is not None:
        kwargs |= dict(device_map=device_map, max_memory=max_memory)
    with _quiet_transformers():
        model, info = LlamaForCausalLM.from_pretrained(path, **kwargs)
    problems = {key: sorted(value) for key, value in info.items() if value}
    if problems:  # shapes were checked already; this is a last line of defence
        raise ValueError(f"transformers could not load {path or 'the weights'} cleanly: {problems}")
    model.eval()
    model.requires_grad_(False)
    return model


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and load reports (we raise our own errors)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
