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

import os
import warnings
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

from lens_attn.gguf_checkpoint import find_gguf_file, read_gguf_checkpoint
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
from lens_attn.llama_checkpoint import (  # noqa: F401  (DTypeName, read_llama_checkpoint: re-exported)
    _WITH_BOS,
    DTypeName,
    _check_tokenizer_vocab,
    _existing_dir,
    _quiet_transformers,
    check_llama_config,
    read_llama_checkpoint,
    resolve_dtype,
)
from lens_attn.rope import hooked_rope_fields

BUNDLED_CHECKPOINT = Path(__file__).parent / "data" / "tiny-llama-2"
"""The miniature Llama 2 built by ``experiments/train_tiny_llama.py``: a Hugging Face directory."""

Backend = Literal["hooked", "bridge"]
DeviceType = Literal["cpu", "cuda", "mps"]

# Extra keyword arguments a local checkpoint accepts (everything else only means something to
# ``HookedTransformer.from_pretrained`` and is passed through for TransformerLens model names).
LOCAL_KWARGS = ("refactor_factored_attn_matrices", "default_prepend_bos", "default_padding_side")


# --------------------------------------------------------------------------------------------------
# argument checking


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
            * a llama.cpp ``.gguf`` file, or a directory holding exactly one ``.gguf`` (and no
              ``config.json``): dequantized to ``dtype``, see :mod:`lens_attn.gguf_checkpoint`.
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
        ValueError: a checkpoint that is not Llama or uses something unsupported (rope scaling
            other than llama3, biases, another activation, a GGUF tensor type that cannot be
            dequantized), mismatched vocabulary sizes, unknown backend/dtype/device.
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
            _existing_source(Path(source).expanduser()), options, from_pretrained_kwargs
        )
    if not isinstance(source, str):
        raise TypeError(
            f"source must be None, a path or a model name string, got {type(source).__name__}"
        )
    if not source.strip():
        raise ValueError("source is an empty string; pass None for the bundled checkpoint")
    path = Path(source).expanduser()
    if path.exists():
        return _load_directory(_existing_source(path), options, from_pretrained_kwargs)
    if _looks_like_path(source):
        raise FileNotFoundError(f"no such directory: {path.absolute()}")
    return _load_name(source, options, from_pretrained_kwargs)


def _looks_like_path(text: str) -> bool:
    if text.startswith((".", "~", os.sep)) or (os.altsep and text.startswith(os.altsep)):
        return True
    if os.sep != "/" and os.sep in text:
        return True
    return text.count("/") >= 2  # hub ids are "owner/name"


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
        **hooked_rope_fields(rope),  # Llama 3.x's llama3 scaling -> NTK-by-parts; {} otherwise
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


def _existing_source(path: Path) -> Path:
    """``path`` if it is a directory or a ``.gguf`` file; else the errors of ``_existing_dir``."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    return _existing_dir(path)


def _load_directory(
    path: Path, options: _Options, kwargs: dict
) -> HookedTransformer | TransformerBridge:
    extras = _local_extras(kwargs, "a local checkpoint")
    device_map, max_memory = _device_map(options)
    read = read_gguf_checkpoint if find_gguf_file(path) is not None else read_llama_checkpoint
    hf_model, tokenizer = read(
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
        if "n_ctx" not in kwargs:  # TransformerLens caps some Llama 3 contexts; keep the model's
            config = LlamaConfig.from_pretrained(official, **hub_kwargs)
            kwargs = {**kwargs, "n_ctx": config.max_position_embeddings}
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
