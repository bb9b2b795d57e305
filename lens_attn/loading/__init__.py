"""Load a Llama 2 family model into TransformerLens from wherever its weights are.

    >>> model = lens_attn.load_model()                    # the bundled tiny checkpoint
    >>> model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_key_value_heads
    (4, 8, 2)
    >>> bridge = lens_attn.load_model(lens_attn.BUNDLED_CHECKPOINT, backend="bridge")
    >>> type(bridge).__name__
    'TransformerBridge'

``source`` is a Hugging Face directory (``"~/models/Llama-2-7b-hf"``, as the bundled one), Meta's
layout (``"~/llama/llama-2-13b"``: ``consolidated.NN.pth`` + ``params.json``), or a TransformerLens
model name (``"meta-llama/Llama-2-7b-hf"``, read from the local Hugging Face cache).

Every source is checked from its headers first (config field by field, every tensor's shape and
type, the tokenizer's size), so nothing that changes the maths is silently dropped. Then the
weights stream into the model one layer at a time (:mod:`lens_attn.loading.stream`): the model is
built with its parameters on the ``meta`` device, and each layer's tensors are read
(:mod:`lens_attn.loading.readers`), folded and centred in float32 as TransformerLens does, rounded
once to ``dtype``, put on the layer's device and assigned. Loading needs about the model's own
memory (a 4-layer Llama-2-7B-shaped bfloat16 checkpoint: 1.02-1.18x its 2.0 GiB, every format and
backend; ``experiments/real_size.md``). The result is a ``HookedTransformer`` with a config derived
from the checkpoint's own ``config.json`` (TransformerLens's name-based Llama configs are
hard-coded for the 7B/13B/70B releases), or a ``TransformerBridge`` around the transformers
``LlamaForCausalLM`` with compatibility mode enabled on the already processed weights. Both expose
``blocks.<layer>.attn.hook_pattern``. Local loading never touches the network.
"""

import os
import warnings
from pathlib import Path
from typing import Any, get_args

import torch
from transformer_lens.model_bridge import TransformerBridge
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from lens_attn.compat import DEFAULT_BACKEND, HookedTransformer, check_backend_available
from lens_attn.loading import stream
from lens_attn.loading.convert import (  # noqa: F401  (check_against_hf, ...: re-exported)
    Backend,
    LoadOptions,
    bridge_from_hf,
    check_against_hf,
    hooked_config_from_hf,
    hooked_from_hf,
    log_prob_max_diff,
)
from lens_attn.loading.devices import (  # noqa: F401  (layer_devices, ...: re-exported)
    bridge_device_map,
    check_n_devices,
    layer_devices,
    resolve_device,
    split_across_devices,
)
from lens_attn.loading.gguf import find_gguf_file, open_gguf, read_gguf_checkpoint
from lens_attn.loading.hf import (  # noqa: F401  (DTypeName, read_llama_checkpoint: re-exported)
    _WITH_BOS,
    DTypeName,
    _check_tokenizer_vocab,
    _existing_dir,
    _quiet_transformers,
    check_llama_config,
    open_llama_directory,
    read_llama_checkpoint,
    resolve_dtype,
)
from lens_attn.loading.hub import (  # noqa: F401  (ModelNotCachedError, llama_model_names: re-exported)
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

BUNDLED_CHECKPOINT = Path(__file__).parent.parent / "data" / "tiny-llama-2"
"""The miniature Llama 2 built by ``experiments/train_tiny_llama.py``: a Hugging Face directory."""


# Extra keyword arguments a local checkpoint accepts (everything else only means something to
# ``HookedTransformer.from_pretrained`` and is passed through for TransformerLens model names).
LOCAL_KWARGS = ("refactor_factored_attn_matrices", "default_prepend_bos", "default_padding_side")


# --------------------------------------------------------------------------------------------------
# argument checking


def resolve_backend(backend: str) -> Backend:
    """Return ``backend`` if it is one of :data:`Backend`'s values, else ValueError listing them."""
    if backend not in get_args(Backend):
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(get_args(Backend))}")
    return backend  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# public entry point


def load_model(
    source: str | os.PathLike | None = None,
    *,
    backend: Backend | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    n_devices: int = 1,
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    fold_value_biases: bool = True,
    tokenizer: PreTrainedTokenizerBase | None = None,
    progress: bool = True,
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
              ``config.json``): dequantized to ``dtype``, see :mod:`lens_attn.loading.gguf`.
            * a directory in Meta's layout: ``params.json``, ``consolidated.NN.pth`` (all shards)
              and ``tokenizer.model`` (next to it or one level up). See
              :mod:`lens_attn.loading.meta`.
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
            ``None`` (default): ``"hooked"`` on TransformerLens 3.9, ``"bridge"`` on 4.x, which
            has no ``HookedTransformer`` (``"hooked"`` raises ValueError there).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:<index>"``, ``"mps"``, or ``None`` for cuda if
            available else cpu.
        dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``, or the torch dtype.
            Weights are folded/centred in this dtype, as TransformerLens does.
        n_devices: GPUs to split the layers over (needs ``device="cuda"`` or ``"cuda:<first>"``).
            ``"hooked"``: contiguous runs of blocks per GPU, by TransformerLens's own mapping
            (:func:`split_across_devices`); each block's weights go to their GPU as they are
            converted (so do all weights with ``device="cuda"``: the CPU holds one layer at a
            time). ``"bridge"``: accelerate's ``device_map="balanced"`` over GPUs
            ``0..n_devices-1``, then TransformerBridge's own whole-model processing on the GPUs
            (a Meta-layout directory must first be converted with
            :func:`lens_attn.loading.meta.convert_meta_to_hf` for that).
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
        progress: default True. Report loading layer by layer (a bar on a terminal, one line
            elsewhere: :mod:`lens_attn.progress`).
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
    backend = resolve_backend(DEFAULT_BACKEND if backend is None else backend)
    check_backend_available(backend)
    torch_dtype = resolve_dtype(dtype)
    target = resolve_device(device)
    check_n_devices(n_devices, target)
    options = LoadOptions(
        backend=backend,
        device=target,
        dtype=torch_dtype,
        n_devices=n_devices,
        fold_ln=fold_ln,
        center_writing_weights=center_writing_weights,
        center_unembed=center_unembed,
        fold_value_biases=fold_value_biases,
        tokenizer=tokenizer,
        progress=progress,
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
    path: Path, options: LoadOptions, kwargs: dict
) -> HookedTransformer | TransformerBridge:
    extras = _local_extras(kwargs, "a local checkpoint")
    name = path.resolve().name if options.backend == "hooked" else str(path)
    multi_gpu_bridge = options.backend == "bridge" and options.n_devices > 1
    if extras.get("refactor_factored_attn_matrices") or multi_gpu_bridge:
        # TransformerLens processes the whole model at once (see _load_whole)
        return _load_whole(path, options, extras, name)
    gguf_file = find_gguf_file(path)
    if gguf_file is not None:
        reader, tokenizer = open_gguf(gguf_file, tokenizer=options.tokenizer)
    else:
        reader, tokenizer = open_llama_directory(path, tokenizer=options.tokenizer)
    build = stream.hooked_from_reader if options.backend == "hooked" else stream.bridge_from_reader
    with reader:
        return build(
            reader,
            tokenizer,
            model_name=name,
            options=options,
            extras=extras,
            progress=options.progress,
        )


def _load_whole(
    path: Path, options: LoadOptions, extras: dict, name: str
) -> HookedTransformer | TransformerBridge:
    """TransformerLens's own processing of a whole transformers model: for
    ``refactor_factored_attn_matrices`` (which mixes every head's matrices at once) and for a
    bridge over several GPUs (accelerate places the weights; the processing then happens there).
    Needs several times the model's memory, unlike the streamed route."""
    device_map, max_memory = bridge_device_map(options.backend, options.n_devices)
    read = read_gguf_checkpoint if find_gguf_file(path) is not None else read_llama_checkpoint
    hf_model, tokenizer = read(
        path,
        dtype=options.dtype,
        tokenizer=options.tokenizer,
        device_map=device_map,
        max_memory=max_memory,
    )
    build = hooked_from_hf if options.backend == "hooked" else bridge_from_hf
    return build(hf_model, tokenizer, model_name=name, options=options, extras=extras)


# --------------------------------------------------------------------------------------------------
# TransformerLens model names -> Hugging Face cache


def _load_name(
    name: str, options: LoadOptions, kwargs: dict
) -> HookedTransformer | TransformerBridge:
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
    official: str, options: LoadOptions, kwargs: dict, cache_dir: Path, *, local_only: bool
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
    device_map, max_memory = bridge_device_map(options.backend, options.n_devices)
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
    return bridge_from_hf(hf_model, tokenizer, model_name=official, options=options, extras=extras)


# --------------------------------------------------------------------------------------------------
# cross-check
