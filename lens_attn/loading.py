"""Load a Llama 2 family model into TransformerLens from wherever its weights are.

    >>> model = lens_attn.load_model()                              # the bundled tiny checkpoint
    >>> model = lens_attn.load_model("~/models/Llama-2-7b-hf")      # a Hugging Face directory
    >>> model = lens_attn.load_model("~/llama/llama-2-13b")         # Meta's consolidated.NN.pth
    >>> model = lens_attn.load_model("meta-llama/Llama-2-7b-hf")    # a TransformerLens model name
    >>> model = lens_attn.load_model(backend="bridge")              # TransformerBridge instead

Every source becomes a transformers ``LlamaForCausalLM`` first (checked field by field, so nothing
that changes the maths is silently dropped), then either a ``HookedTransformer`` built from a config
derived from the checkpoint's own ``config.json`` (TransformerLens's name-based Llama configs are
hard-coded for the 7B/13B/70B releases) and TransformerLens's ``convert_llama_weights``, or a
``TransformerBridge`` around the HF model with ``enable_compatibility_mode()``. Both expose
``blocks.<layer>.attn.hook_pattern``. Local loading never touches the network.
"""

import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.utilities.multi_gpu import get_device_for_block_index
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from lens_attn import meta_checkpoint
from lens_attn.hub import (  # noqa: F401  (ModelNotCachedError, llama_model_names: re-exported)
    ModelNotCachedError,
    _hub_offline,
    _hub_offline_mode,
    _hub_unreachable,
    _not_cached,
    hub_cache_dir,
    is_cached,
    llama_model_names,
    resolve_model_name,
)

BUNDLED_CHECKPOINT = Path(__file__).parent / "data" / "tiny-llama-2"
"""The miniature Llama 2 built by ``experiments/train_tiny_llama.py``: a Hugging Face directory."""

Backend = Literal["hooked", "bridge"]
DTypeName = Literal["float32", "bfloat16", "float16"]
DeviceType = Literal["cpu", "cuda", "mps"]

_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in get_args(DTypeName)}

# Extra keyword arguments a local checkpoint accepts (everything else only means something to
# ``HookedTransformer.from_pretrained`` and is passed through for TransformerLens model names).
LOCAL_KWARGS = ("refactor_factored_attn_matrices", "default_prepend_bos", "default_padding_side")

# Llama prepends BOS. Saying so explicitly also stops TransformerLens's get_tokenizer_with_bos from
# re-loading the tokenizer by its name_or_path, which for a hub name ignores our cache_dir.
_WITH_BOS = {"add_bos_token": True}

# Older transformers saved the rotary ``inv_freq`` buffer; it is recomputed from rope_theta on load.
_DERIVED_BUFFER_SUFFIX = "rotary_emb.inv_freq"


# --------------------------------------------------------------------------------------------------
# argument checking


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


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> cuda if available, else cpu. Valid types: cpu, cuda, cuda:<index>, mps."""
    valid = "cpu, cuda, cuda:<index>, mps, or None (cuda if available, else cpu)"
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; valid: {valid}") from None
    if resolved.type not in get_args(DeviceType):
        raise ValueError(f"unknown device {device!r}; valid: {valid}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use 'cpu'")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available; use 'cpu'")
    return resolved


def resolve_backend(backend: str) -> Backend:
    """Return ``backend`` if it is one of :data:`Backend`'s values, else ValueError listing them."""
    if backend not in get_args(Backend):
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(get_args(Backend))}")
    return backend  # type: ignore[return-value]


def _check_n_devices(n_devices: int, device: torch.device) -> None:
    if isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1:
        raise ValueError(f"n_devices must be a positive integer, got {n_devices!r}")
    if n_devices > 1 and device.type != "cuda":
        raise ValueError(f"n_devices={n_devices} needs device='cuda', got {str(device)!r}")
    first = device.index or 0  # the layers go to GPUs first, first + 1, ...
    visible = torch.cuda.device_count()
    if n_devices > 1 and first + n_devices > visible:
        raise ValueError(
            f"n_devices={n_devices} from {str(device)!r} needs GPUs "
            f"{first}..{first + n_devices - 1} but only {visible} CUDA devices are visible"
        )


# --------------------------------------------------------------------------------------------------
# public entry point


@dataclass(frozen=True)
class _Options:
    """load_model's checked arguments, passed down to the source-specific loaders."""

    backend: Backend
    device: torch.device
    dtype: torch.dtype
    n_devices: int
    fold_ln: bool
    center_writing_weights: bool
    center_unembed: bool
    fold_value_biases: bool
    tokenizer: PreTrainedTokenizerBase | None


def load_model(
    source: str | os.PathLike | None = None,
    *,
    backend: Backend = "hooked",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    n_devices: int = 1,
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    fold_value_biases: bool = True,
    tokenizer: PreTrainedTokenizerBase | None = None,
    **from_pretrained_kwargs: Any,
) -> HookedTransformer | TransformerBridge:
    """Load a Llama 2 family model for attention-head analysis.

    Args:
        source: where the weights are.

            * ``None``: the bundled checkpoint :data:`BUNDLED_CHECKPOINT` (FileNotFoundError, with
              the command that builds it, if it has not been built).
            * a directory in Hugging Face format: ``config.json``, ``model.safetensors`` (or shards
              with ``model.safetensors.index.json``) or ``pytorch_model*.bin`` (read with
              ``weights_only=True``), and ``tokenizer.json`` and/or ``tokenizer.model``.
            * a directory in Meta's layout: ``params.json``, ``consolidated.NN.pth`` (all shards)
              and ``tokenizer.model`` (next to it or one level up). See
              :mod:`lens_attn.meta_checkpoint`.
            * a TransformerLens model name or alias, e.g. ``"meta-llama/Llama-2-7b-hf"``,
              ``"Llama-2-13b-chat"``, ``"codellama/CodeLlama-7b-hf"``. Weights come from the
              Hugging Face cache; if they are not there and cannot be downloaded,
              :class:`ModelNotCachedError`.

            A string that exists on disk is a path. One that does not exist but looks like a path
            (starts with ``.``, ``~`` or ``/``, or has more than one ``/``) raises
            FileNotFoundError; otherwise it is looked up as a model name (ValueError with close
            matches if unknown).
        backend: ``"hooked"`` for a ``HookedTransformer``; ``"bridge"`` for a
            ``TransformerBridge`` around the transformers model with
            ``enable_compatibility_mode()`` called (same processing flags). Both have
            ``blocks.<layer>.attn.hook_pattern`` and the other ``HookedTransformer`` hook names.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:<index>"``, ``"mps"``, or ``None`` for cuda if
            available else cpu.
        dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``, or the torch dtype.
            Weights are folded/centred in this dtype, as TransformerLens does.
        n_devices: GPUs to split the layers over (needs ``device="cuda"`` or ``"cuda:<first>"``).
            ``"hooked"``: contiguous runs of blocks per GPU, by TransformerLens's own mapping
            (:func:`split_across_devices`); the weights are loaded and processed on the CPU
            first. ``"bridge"``: accelerate's ``device_map="balanced"`` over GPUs
            ``0..n_devices-1`` (a Meta-layout directory must first be converted with
            :func:`lens_attn.meta_checkpoint.convert_meta_to_hf` for that).
        fold_ln: default True. Fold each RMSNorm's weight into the weights that read its output
            (``ln1``/``ln2``/``ln_final`` become ``RMSNormPre``). Does not change the outputs.
        center_writing_weights: default True. Subtract the mean from every weight writing to the
            residual stream. A no-op for Llama: TransformerLens 3.9 centres only for LayerNorm
            models, since RMSNorm does not remove the mean (centring would change the outputs).
        center_unembed: default True. Subtract the mean over the vocabulary from ``W_U``: logits
            shift per position, log-probabilities do not change.
        fold_value_biases: default True. Fold value biases into ``b_O`` (Llama has none: a no-op).
        tokenizer: use this tokenizer instead of the checkpoint's. Its ``len()`` must not exceed
            the embedding's row count.
        **from_pretrained_kwargs: for a model name, passed to
            ``HookedTransformer.from_pretrained`` (``"hooked"``). For a local checkpoint (and for
            ``"bridge"``) only ``refactor_factored_attn_matrices``, ``default_prepend_bos`` and
            ``default_padding_side`` are accepted; others raise TypeError.

    Returns:
        A ``HookedTransformer`` (``backend="hooked"``) or ``TransformerBridge`` (``"bridge"``) in
        eval mode.

    Raises:
        FileNotFoundError: missing path, missing bundled checkpoint, missing shard, weights or
            tokenizer files.
        ModelNotCachedError: a model name whose weights are not cached and cannot be downloaded.
        ValueError: a checkpoint that is not Llama or uses something unsupported (rope scaling,
            biases, another activation), mismatched vocabulary sizes, unknown backend/dtype/device.
    """
    backend = resolve_backend(backend)
    torch_dtype = resolve_dtype(dtype)
    target = resolve_device(device)
    _check_n_devices(n_devices, target)
    options = _Options(
        backend=backend,
        device=target,
        dtype=torch_dtype,
        n_devices=n_devices,
        fold_ln=fold_ln,
        center_writing_weights=center_writing_weights,
        center_unembed=center_unembed,
        fold_value_biases=fold_value_biases,
        tokenizer=tokenizer,
    )
    if source is None:
        if not (BUNDLED_CHECKPOINT / "config.json").is_file():
            raise FileNotFoundError(
                f"the bundled checkpoint {BUNDLED_CHECKPOINT} is missing: it is trained, not "
                "downloaded. Build it with `python experiments/train_tiny_llama.py --out "
                "lens_attn/data/tiny-llama-2` from the repository root, or pass a checkpoint "
                "directory or a model name to load_model"
            )
        return _load_directory(BUNDLED_CHECKPOINT, options, from_pretrained_kwargs)
    if isinstance(source, os.PathLike):
        return _load_directory(
            _existing_dir(Path(source).expanduser()), options, from_pretrained_kwargs
        )
    if not isinstance(source, str):
        raise TypeError(
            f"source must be None, a path or a model name string, got {type(source).__name__}"
        )
    if not source.strip():
        raise ValueError("source is an empty string; pass None for the bundled checkpoint")
    path = Path(source).expanduser()
    if path.exists():
        return _load_directory(_existing_dir(path), options, from_pretrained_kwargs)
    if _looks_like_path(source):
        raise FileNotFoundError(f"no such directory: {path.absolute()}")
    return _load_name(source, options, from_pretrained_kwargs)


def _looks_like_path(text: str) -> bool:
    if text.startswith((".", "~", os.sep)) or (os.altsep and text.startswith(os.altsep)):
        return True
    if os.sep != "/" and os.sep in text:
        return True
    return text.count("/") >= 2  # hub ids are "owner/name"


def _existing_dir(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"no such directory: {path.absolute()}")
    if not path.is_dir():
        raise NotADirectoryError(
            f"expected a checkpoint directory, got a file: {path}; pass the directory that holds "
            "config.json (Hugging Face) or params.json (Meta)"
        )
    return path


# --------------------------------------------------------------------------------------------------
# local directories -> transformers LlamaForCausalLM


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
    eager attention (what ``TransformerBridge`` hooks need) and is in eval mode on the CPU unless
    ``device_map`` is given (Hugging Face directories only).
    """
    path = _existing_dir(Path(directory).expanduser())
    torch_dtype = resolve_dtype(dtype)
    if (path / "config.json").is_file():
        raw = _read_json(path / "config.json")
        check_llama_config(raw, source=str(path / "config.json"))
        config = LlamaConfig.from_dict(raw)
        shapes = _hf_weight_shapes(path)
        _check_state_shapes(shapes, config, source=str(path))
        tokenizer = tokenizer if tokenizer is not None else _hf_tokenizer(path)
        _check_tokenizer_vocab(tokenizer, config.vocab_size, source=str(path))
        model = _llama_from_pretrained(
            str(path), config, dtype=torch_dtype, device_map=device_map, max_memory=max_memory
        )
    elif meta_checkpoint.is_meta_checkpoint(path):
        if device_map is not None:
            raise ValueError(
                f"{path} is in Meta's layout, which cannot be loaded with a device_map; convert "
                "it once with lens_attn.meta_checkpoint.convert_meta_to_hf(meta_dir, out_dir) and "
                "load out_dir"
            )
        raw, state = meta_checkpoint.read_meta_checkpoint(path)
        config = LlamaConfig.from_dict(raw)
        _check_state_shapes({k: tuple(v.shape) for k, v in state.items()}, config, source=str(path))
        if tokenizer is None:
            tokenizer_model = meta_checkpoint.find_meta_tokenizer(path)
            if tokenizer_model is None:
                raise FileNotFoundError(
                    f"no tokenizer.model in {path} or its parent; Meta ships it next to the model "
                    "directories. Pass tokenizer=... to use another"
                )
            tokenizer = _sentencepiece_tokenizer(tokenizer_model)
        _check_tokenizer_vocab(tokenizer, config.vocab_size, source=str(path))
        model = _llama_from_pretrained(None, config, dtype=torch_dtype, state_dict=state)
    else:
        present = sorted(p.name for p in path.iterdir())[:12]
        raise ValueError(
            f"not a Llama checkpoint: {path} has neither config.json (Hugging Face layout) nor "
            f"params.json (Meta layout); it holds {present or 'nothing'}"
        )
    return model, tokenizer


def check_llama_config(raw: dict, *, source: str = "config.json") -> None:
    """Refuse a Hugging Face ``config.json`` that is not a plain Llama 2 architecture.

    Refused (ValueError naming the field): ``model_type`` other than ``llama`` or
    ``architectures`` other than ``["LlamaForCausalLM"]``; ``hidden_act`` other than silu;
    ``attention_bias`` or ``mlp_bias`` true; ``rope_scaling`` / ``rope_parameters`` of a type other
    than default; ``head_dim`` other than ``hidden_size // num_attention_heads``; heads that do not
    divide; ``quantization_config``. ``pretraining_tp > 1`` is accepted: it only split the matmuls
    in old transformers' forward, which is mathematically the same (transformers 5 ignores it).
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
        raise ValueError(f"{source} is missing {missing}; a Llama config.json needs {required}")
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
        rope = raw.get(key)
        if rope is None:
            continue
        kind = (
            rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else rope
        )
        if kind not in ("default", None):
            raise ValueError(
                f"{source}: {key} of type {kind!r} is not supported; valid: null or type 'default' "
                "(plain rotary embeddings as in Llama 2)"
            )
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


def _hf_weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape for the weights in a HF directory, read without loading the data."""
    for index_name, single_name in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if (path / index_name).is_file():
            weight_map = _read_json(path / index_name).get("weight_map", {})
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
        return shapes
    present = sorted(p.name for p in path.iterdir())[:12]
    raise FileNotFoundError(
        f"no weights in {path}: expected model.safetensors, model.safetensors.index.json with "
        "its shards, pytorch_model.bin, or pytorch_model.bin.index.json with its shards; "
        f"found {present}"
    )


def _file_shapes(file: Path) -> dict[str, tuple[int, ...]]:
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


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------------------------------
# transformers model -> HookedTransformer / TransformerBridge


def hooked_config_from_hf(
    config: LlamaConfig,
    *,
    model_name: str = "llama",
    dtype: torch.dtype = torch.float32,
    fold_ln: bool = True,
    default_prepend_bos: bool | None = None,
) -> HookedTransformerConfig:
    """A ``HookedTransformerConfig`` for a checked Llama ``config``, built from its own fields.

    Mirrors what TransformerLens's ``convert_hf_model_config`` does for ``LlamaForCausalLM`` (RMS
    norms, rotary embeddings over the whole head in rotate-half order, gated SiLU MLP), but reads
    every size from ``config`` rather than a hard-coded table. The config is on the CPU with one
    device; :func:`load_model` moves the finished model.
    """
    n_heads = config.num_attention_heads
    d_head = config.hidden_size // n_heads
    n_kv_heads = config.num_key_value_heads or n_heads
    rope = config.rope_parameters or {}
    return HookedTransformerConfig(
        model_name=model_name,
        original_architecture="LlamaForCausalLM",
        d_model=config.hidden_size,
        d_head=d_head,
        n_heads=n_heads,
        # TransformerLens uses grouped-query attention only when this is not None
        n_key_value_heads=n_kv_heads if n_kv_heads != n_heads else None,
        d_mlp=config.intermediate_size,
        n_layers=config.num_hidden_layers,
        n_ctx=config.max_position_embeddings,
        d_vocab=config.vocab_size,
        act_fn="silu",
        eps=config.rms_norm_eps,
        normalization_type="RMSPre" if fold_ln else "RMS",
        final_rms=True,
        gated_mlp=True,
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        rotary_base=rope.get("rope_theta", 10000.0),
        rotary_adjacent_pairs=False,  # HF Llama rotates halves; Meta's adjacent pairs are permuted
        tokenizer_name=None,  # the tokenizer is passed in; never fetch one by name
        init_weights=False,  # the weights are loaded right after
        default_prepend_bos=True if default_prepend_bos is None else default_prepend_bos,
        dtype=dtype,
        device="cpu",
        n_devices=1,
    )


def _hooked_from_hf(
    hf_model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    *,
    model_name: str,
    options: _Options,
    extras: dict,
) -> HookedTransformer:
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

    cfg = hooked_config_from_hf(
        hf_model.config,
        model_name=model_name,
        dtype=options.dtype,
        fold_ln=options.fold_ln,
        default_prepend_bos=extras.get("default_prepend_bos"),
    )
    state_dict = convert_llama_weights(hf_model, cfg)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "HookedTransformer is deprecated", DeprecationWarning)
        model = HookedTransformer(
            cfg,
            tokenizer=tokenizer,
            move_to_device=False,
            default_padding_side=extras.get("default_padding_side"),
        )
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=options.fold_ln,
        center_writing_weights=options.center_writing_weights,
        center_unembed=options.center_unembed,
        fold_value_biases=options.fold_value_biases,
        refactor_factored_attn_matrices=extras.get("refactor_factored_attn_matrices", False),
    )
    # Processing happened on the CPU; now place the modules on their devices.
    model.cfg.device = str(options.device)
    model.cfg.n_devices = options.n_devices
    return split_across_devices(model).eval()


def layer_devices(cfg: HookedTransformerConfig) -> list[torch.device]:
    """The device of every block of a ``HookedTransformer`` split over ``cfg.n_devices`` GPUs.

    TransformerLens's own mapping, ``multi_gpu.get_device_for_block_index``: block ``i`` goes to GPU
    ``cfg.device.index + i * n_devices // n_layers``, i.e. contiguous runs of blocks (3 layers on 2
    GPUs: blocks 0, 1 on the first, block 2 on the second). ``HookedTransformer.forward`` moves the
    residual stream to exactly this device before block ``i``. A CPU config maps every block to
    the CPU.
    """
    return [get_device_for_block_index(layer, cfg) for layer in range(cfg.n_layers)]


def split_across_devices(model: HookedTransformer) -> HookedTransformer:
    """Put each module of ``model`` on the device its forward pass expects; returns the model.

    TransformerLens 3.9's ``move_model_modules_to_device`` puts *every* module on the one GPU with
    the most free memory, while ``forward`` moves the residual stream to
    ``get_device_for_block_index(i, cfg)`` before block ``i``. This follows ``forward``: the
    embedding on block 0's device, block ``i`` on :func:`layer_devices`'s ``[i]``, and ``ln_final``
    and the unembedding on the last block's device (where the residual stream is after the last
    block). With ``n_devices == 1`` it is ``move_model_modules_to_device`` unchanged.
    """
    if model.cfg.n_devices == 1:
        model.move_model_modules_to_device()
        return model
    devices = layer_devices(model.cfg)
    model.embed.to(devices[0])
    if model.cfg.positional_embedding_type != "rotary":
        model.pos_embed.to(devices[0])
    for block, device in zip(model.blocks, devices, strict=True):
        block.to(device)
    if hasattr(model, "ln_final"):
        model.ln_final.to(devices[-1])
    model.unembed.to(devices[-1])
    return model


def _bridge_from_hf(
    hf_model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    *,
    model_name: str,
    options: _Options,
    extras: dict,
) -> TransformerBridge:
    if getattr(hf_model, "hf_device_map", None) is None:
        hf_model.to(options.device)
    if extras.get("default_padding_side") is not None:
        tokenizer.padding_side = extras["default_padding_side"]
    # With hf_model given, boot_transformers reads hf_model.config instead of fetching one, so the
    # name is only a label. It does not move or cast hf_model; we did.
    bridge = TransformerBridge.boot_transformers(
        model_name, hf_model=hf_model, tokenizer=tokenizer, dtype=options.dtype
    )
    bridge.enable_compatibility_mode(
        disable_warnings=True,
        fold_ln=options.fold_ln,
        center_writing_weights=options.center_writing_weights,
        center_unembed=options.center_unembed,
        fold_value_biases=options.fold_value_biases,
        refactor_factored_attn_matrices=extras.get("refactor_factored_attn_matrices", False),
    )
    if extras.get("default_prepend_bos") is not None:
        bridge.cfg.default_prepend_bos = extras["default_prepend_bos"]
    # TransformerLens 3.9's bridge config reads rope_theta from a pre-transformers-5 attribute, so
    # it reports 10000 for any theta. Only metadata (HF's rotary module does the maths), but
    # analysis code reads it: set it from the model's config.
    rope = hf_model.config.rope_parameters or {}
    bridge.cfg.rotary_base = rope.get("rope_theta", 10000.0)
    bridge.cfg.rotary_dim = bridge.cfg.d_head
    return bridge.eval()


def _device_map(options: _Options) -> tuple[str | dict | None, dict | None]:
    """accelerate placement for a multi-GPU bridge, from TransformerLens's own resolver."""
    if options.backend != "bridge" or options.n_devices == 1:
        return None, None
    from transformer_lens.utilities.multi_gpu import resolve_device_map

    return resolve_device_map(options.n_devices, None, None)


def _local_extras(kwargs: dict, what: str) -> dict:
    unknown = sorted(set(kwargs) - set(LOCAL_KWARGS))
    if unknown:
        raise TypeError(
            f"load_model() got unexpected keyword arguments {unknown} for {what}; accepted: "
            f"{', '.join(LOCAL_KWARGS)} (other HookedTransformer.from_pretrained arguments apply "
            "only to TransformerLens model names with backend='hooked')"
        )
    return kwargs


def _load_directory(
    path: Path, options: _Options, kwargs: dict
) -> HookedTransformer | TransformerBridge:
    extras = _local_extras(kwargs, "a local checkpoint")
    device_map, max_memory = _device_map(options)
    hf_model, tokenizer = read_llama_checkpoint(
        path,
        dtype=options.dtype,
        tokenizer=options.tokenizer,
        device_map=device_map,
        max_memory=max_memory,
    )
    build = _hooked_from_hf if options.backend == "hooked" else _bridge_from_hf
    name = path.resolve().name if options.backend == "hooked" else str(path)
    return build(hf_model, tokenizer, model_name=name, options=options, extras=extras)


# --------------------------------------------------------------------------------------------------
# TransformerLens model names -> Hugging Face cache


def _load_name(name: str, options: _Options, kwargs: dict) -> HookedTransformer | TransformerBridge:
    official = resolve_model_name(name)
    cache_dir = hub_cache_dir()
    cached = is_cached(official, cache_dir)
    if not cached:
        reason = "offline mode (HF_HUB_OFFLINE) is on" if _hub_offline() else _hub_unreachable()
        if reason:
            raise _not_cached(name, official, cache_dir, reason)
    try:
        if cached:  # read from the cache only: no update check, no network at all
            with _hub_offline_mode():
                return _load_hub_model(official, options, kwargs, cache_dir, local_only=True)
        return _load_hub_model(official, options, kwargs, cache_dir, local_only=False)
    except OSError as err:  # hub and network errors are OSErrors (transformers re-raises as such)
        first_line = str(err).splitlines()[0].rstrip(".") if str(err) else ""
        reason = f"{type(err).__name__}: {first_line}"
        if cached:
            reason = f"it is only partly cached ({reason})"
        raise _not_cached(name, official, cache_dir, reason) from None


def _load_hub_model(
    official: str, options: _Options, kwargs: dict, cache_dir: Path, *, local_only: bool
) -> HookedTransformer | TransformerBridge:
    from transformers import AutoTokenizer

    hub_kwargs: dict[str, Any] = dict(cache_dir=str(cache_dir))
    if local_only:
        hub_kwargs["local_files_only"] = True
    tokenizer = options.tokenizer
    if tokenizer is None:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(official, **hub_kwargs, **_WITH_BOS)
    if options.backend == "hooked":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "HookedTransformer is deprecated", DeprecationWarning)
            model = HookedTransformer.from_pretrained(
                official,
                fold_ln=options.fold_ln,
                center_writing_weights=options.center_writing_weights,
                center_unembed=options.center_unembed,
                fold_value_biases=options.fold_value_biases,
                device=str(options.device),
                n_devices=options.n_devices,
                dtype=options.dtype,
                tokenizer=tokenizer,
                move_to_device=False,  # it would put every module on one GPU; placed below
                **hub_kwargs,
                **kwargs,
            )
        _check_tokenizer_vocab(tokenizer, model.cfg.d_vocab, source=official)
        return split_across_devices(model).eval()
    extras = _local_extras(kwargs, "backend='bridge'")
    config = LlamaConfig.from_pretrained(official, **hub_kwargs)
    check_llama_config(config.to_dict(), source=f"{official} config.json")
    _check_tokenizer_vocab(tokenizer, config.vocab_size, source=official)
    device_map, max_memory = _device_map(options)
    placement = dict(device_map=device_map, max_memory=max_memory) if device_map else {}
    with _quiet_transformers():
        hf_model = LlamaForCausalLM.from_pretrained(
            official,
            config=config,
            dtype=options.dtype,
            attn_implementation="eager",  # TransformerBridge hooks need the eager attention path
            **hub_kwargs,
            **placement,
        )
    hf_model.eval().requires_grad_(False)
    return _bridge_from_hf(hf_model, tokenizer, model_name=official, options=options, extras=extras)


# --------------------------------------------------------------------------------------------------
# cross-check


def log_prob_max_diff(
    model: HookedTransformer | TransformerBridge,
    hf_model: LlamaForCausalLM,
    tokens: Int[Tensor, "batch pos"],
) -> float:
    """Largest |log p_model - log p_hf| over every position and vocabulary entry.

    Log-probabilities, not logits: ``center_unembed`` shifts logits by a per-position constant.
    Compare against an HF model loaded with ``attn_implementation="eager"``; sdpa reorders ops.
    """
    with torch.no_grad():
        ours = model(tokens.to(model.cfg.device), return_type="logits")
        hf_device = next(hf_model.parameters()).device
        theirs = hf_model(tokens.to(hf_device)).logits
    ours = ours.float().log_softmax(-1).cpu()
    theirs = theirs.float().log_softmax(-1).cpu()
    if ours.shape != theirs.shape:
        raise ValueError(
            f"output shapes differ: model {tuple(ours.shape)}, HF {tuple(theirs.shape)}"
        )
    return (ours - theirs).abs().max().item()


def check_against_hf(
    model: HookedTransformer | TransformerBridge,
    hf_model: LlamaForCausalLM,
    tokens: Int[Tensor, "batch pos"],
    *,
    atol: float = 1e-4,
) -> float:
    """Check that ``model`` computes the same log-probabilities as transformers' ``hf_model``.

    Returns the largest absolute difference; raises AssertionError if it exceeds ``atol``. 1e-4
    suits float32: folding and centring reorder float32 sums (~1e-6 relative each) over a few
    layers. Use a looser ``atol`` for bfloat16/float16.
    """
    diff = log_prob_max_diff(model, hf_model, tokens)
    if not diff <= atol:  # also catches NaN
        raise AssertionError(
            f"log-probabilities differ from transformers' LlamaForCausalLM by {diff:.3g} > "
            f"atol={atol:g}"
        )
    return diff
