"""Build a model from a :class:`~lens_attn.loading.readers.CheckpointReader` one layer at a time.

The model is constructed with its parameters on PyTorch's ``meta`` device (shapes, no memory;
buffers such as rotary tables and masks are real), then filled layer by layer: each of the layer's
tensors is read, folded and converted in float32, rounded once to the target dtype, moved to the
layer's device and assigned in place of the meta parameter (``assign``-style, no copy into a
preallocated tensor). So loading needs the finished model plus one layer in flight, whatever the
source and backend: a Llama-2-7B in bfloat16 loads in about its own 12.6 GiB.

The processing is TransformerLens's, done per layer on transformers-named tensors:

* ``fold_ln``: each RMSNorm's weight multiplies the input columns of the weights that read its
  output (q/k/v by ``input_layernorm``, gate/up by ``post_attention_layernorm``, the unembedding by
  ``model.norm``), and the norm becomes weightless (``RMSPre`` in a ``HookedTransformer``, a weight
  of ones in a bridge).
* ``center_unembed``: the unembedding's mean over the vocabulary is subtracted (log-probabilities
  do not change).
* ``center_writing_weights`` and ``fold_value_biases`` are no-ops for Llama: TransformerLens centres
  only LayerNorm models (RMSNorm does not remove the mean), and Llama has no biases.

Entry points: :func:`hooked_from_reader`, :func:`bridge_from_reader` (used by ``load_model``) and
:func:`hf_model_from_reader` (a plain transformers model, unprocessed by default).
"""

import contextlib
import warnings
from collections.abc import Iterator

import einops
import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.model_bridge import TransformerBridge
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from lens_attn.compat import HookedTransformer, check_backend_available
from lens_attn.loading.convert import LoadOptions, finish_bridge, hooked_config_from_hf
from lens_attn.loading.devices import layer_devices, split_across_devices
from lens_attn.loading.readers import CheckpointReader
from lens_attn.progress import progress_bar
from lens_attn.validation import check_finite_weights

EMBED, NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
_ATTN_NORM, _MLP_NORM = "input_layernorm.weight", "post_attention_layernorm.weight"
_READ_BY_ATTN_NORM = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
)
_READ_BY_MLP_NORM = ("mlp.gate_proj.weight", "mlp.up_proj.weight")
_OTHERS = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


@contextlib.contextmanager
def empty_parameters() -> Iterator[None]:
    """Inside, every ``nn.Module`` parameter is created on the ``meta`` device; buffers are real.

    What accelerate's ``init_empty_weights(include_buffers=False)`` does: modules keep their
    computed buffers (rotary tables, causal masks) while their weights take no memory until
    :func:`assign_parameters` replaces them.
    """
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def assign_parameters(model: nn.Module, state: dict[str, Tensor], device: torch.device) -> None:
    """Replace ``model``'s parameters named in ``state`` by those tensors, moved to ``device``.

    Shapes must match the parameters being replaced (ValueError otherwise); ``requires_grad`` is
    kept. Nothing is copied into the old parameter: it is a ``meta`` placeholder.
    """
    for name, tensor in state.items():
        module_name, _, param_name = name.rpartition(".")
        module = model.get_submodule(module_name)
        old = module._parameters.get(param_name)
        if old is None:
            raise ValueError(f"the model has no parameter {name}")
        if old.shape != tensor.shape:
            raise ValueError(
                f"{name}: got shape {tuple(tensor.shape)}, expected {tuple(old.shape)}"
            )
        param = nn.Parameter(tensor.to(device), requires_grad=old.requires_grad)
        param._lens_attn_loaded = True  # what check_all_assigned looks for
        setattr(module, param_name, param)


def check_all_assigned(model: nn.Module, *, source: str) -> None:
    """ValueError if a parameter was never assigned (a bug, or a tensor the reader lacks)."""
    missing = [
        name for name, p in model.named_parameters() if not getattr(p, "_lens_attn_loaded", False)
    ]
    if missing:
        raise ValueError(f"{source}: no weights were loaded for {missing[:6]}")
    for param in model.parameters():
        del param._lens_attn_loaded


# --------------------------------------------------------------------------------------------------
# reading and folding, in transformers' names


ROW_CHUNK = 1024  # rows processed at once in float32 (16 MiB for d_model 4096)


def _read(reader: CheckpointReader, name: str, dtype: torch.dtype) -> Tensor:
    """One tensor in ``dtype``, checked for NaN and infinities."""
    tensor = reader.read(name, dtype)
    check_finite_weights([(name, tensor)], source=reader.source)
    return tensor


def _process_rows_(
    weight: Float[Tensor, "rows columns"],
    scale: Float[Tensor, " columns"] | None,
    shift: Float[Tensor, " columns"] | None = None,
) -> Tensor:
    """``weight = weight * scale - shift`` in place, computed in float32 a block of rows at a time
    and rounded once to ``weight``'s dtype (as TransformerLens's processing, which upcasts the
    whole model to float32, without the float32 copy)."""
    for start in range(0, weight.shape[0], ROW_CHUNK):
        rows = weight[start : start + ROW_CHUNK]
        block = rows.float()  # for float32 weights, ``rows`` itself: updated in place
        if scale is not None:
            block *= scale
        if shift is not None:
            block -= shift
        rows.copy_(block)
    return weight


def _column_mean(weight: Tensor, scale: Tensor | None) -> Tensor:
    """The mean over rows of ``weight * scale`` in float32 (accumulated in float64), by blocks."""
    total = torch.zeros(weight.shape[1], dtype=torch.float64)
    for start in range(0, weight.shape[0], ROW_CHUNK):
        block = weight[start : start + ROW_CHUNK].float()  # for float32: a view, not a copy
        if scale is not None:
            block = block * scale
        total += block.sum(0, dtype=torch.float64)
    return (total / weight.shape[0]).float()


def read_unembed(
    reader: CheckpointReader, dtype: torch.dtype, *, fold_ln: bool, center_unembed: bool
) -> dict[str, Tensor]:
    """``lm_head.weight`` (vocab, d_model) and ``model.norm.weight``, processed, in ``dtype``."""
    unembed, norm = _read(reader, LM_HEAD, dtype), _read(reader, NORM, dtype)
    scale = norm.float() if fold_ln else None
    shift = _column_mean(unembed, scale) if center_unembed else None
    if fold_ln or center_unembed:
        _process_rows_(unembed, scale, shift)
    if fold_ln:
        norm = torch.ones_like(norm)
    return {LM_HEAD: unembed, NORM: norm}


def read_layer(
    reader: CheckpointReader, layer: int, dtype: torch.dtype, *, fold_ln: bool
) -> dict[str, Tensor]:
    """Layer ``layer``'s nine tensors under their transformers names, processed, in ``dtype``."""
    prefix = f"model.layers.{layer}."
    out = {}
    for norm_name, readers in ((_ATTN_NORM, _READ_BY_ATTN_NORM), (_MLP_NORM, _READ_BY_MLP_NORM)):
        norm = _read(reader, prefix + norm_name, dtype)
        for name in readers:
            weight = _read(reader, prefix + name, dtype)
            out[prefix + name] = _process_rows_(weight, norm.float()) if fold_ln else weight
        out[prefix + norm_name] = torch.ones_like(norm) if fold_ln else norm
    for name in _OTHERS:
        out[prefix + name] = _read(reader, prefix + name, dtype)
    return out


def _layers(reader: CheckpointReader, *, progress: bool):
    n_layers = reader.config.num_hidden_layers
    return progress_bar(range(n_layers), desc="loading layers", unit="layer", enabled=progress)


# --------------------------------------------------------------------------------------------------
# transformers model (the bridge wraps it)


def hf_model_from_reader(
    reader: CheckpointReader,
    *,
    dtype: torch.dtype,
    fold_ln: bool = False,
    center_unembed: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> LlamaForCausalLM:
    """A transformers ``LlamaForCausalLM`` (eager attention, eval mode, no gradients) streamed from
    ``reader``, every weight placed on ``device`` as it is read.

    With ``fold_ln`` / ``center_unembed`` the weights are processed as the module docstring says
    (and a tied unembedding is untied, since it no longer equals the embedding); the defaults give
    the checkpoint's own weights.
    """
    device = torch.device(device)
    config = LlamaConfig.from_dict(reader.config.to_dict())
    config._attn_implementation = "eager"  # TransformerBridge hooks need the eager attention path
    processed = fold_ln or center_unembed
    tied = config.tie_word_embeddings and not processed
    config.tie_word_embeddings = tied
    config.dtype = dtype
    with empty_parameters(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' notes on initialising empty weights
        model = LlamaForCausalLM(config)
    model.requires_grad_(False)
    assign_parameters(model, {EMBED: _read(reader, EMBED, dtype)}, device)
    if tied:
        assign_parameters(model, {NORM: _read(reader, NORM, dtype)}, device)
        model.tie_weights()
    else:
        unembed = read_unembed(reader, dtype, fold_ln=fold_ln, center_unembed=center_unembed)
        assign_parameters(model, unembed, device)
    for layer in _layers(reader, progress=progress):
        assign_parameters(model, read_layer(reader, layer, dtype, fold_ln=fold_ln), device)
    check_all_assigned(model, source=reader.source)
    model.to(device)  # the buffers (rotary inv_freq); parameters are there already
    return model.eval()


def bridge_from_reader(
    reader: CheckpointReader,
    tokenizer: PreTrainedTokenizerBase,
    *,
    model_name: str,
    options: LoadOptions,
    extras: dict,
    progress: bool = False,
) -> TransformerBridge:
    """A ``TransformerBridge`` in compatibility mode around a streamed, already processed model.

    TransformerBridge's own ``process_weights`` extracts the whole state dict, upcasts it to
    float32 and processes it at once (7.3x the weights of a bfloat16 7B-shaped model); here the
    same folding happened layer by layer as the weights were read, so compatibility mode is
    enabled without processing. ``refactor_factored_attn_matrices`` needs the whole model and is
    not done here (``load_model`` takes TransformerBridge's route for it).
    """
    hf_model = hf_model_from_reader(
        reader,
        dtype=options.dtype,
        fold_ln=options.fold_ln,
        center_unembed=options.center_unembed,
        device=options.device,
        progress=progress,
    )
    if extras.get("default_padding_side") is not None:
        tokenizer.padding_side = extras["default_padding_side"]
    bridge = TransformerBridge.boot_transformers(
        model_name,
        hf_model=hf_model,
        tokenizer=tokenizer,
        dtype=options.dtype,
        device=str(options.device),
    )
    bridge.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    if hasattr(bridge, "_weights_processed"):  # TransformerLens 4.x: refuse processing twice
        bridge._weights_processed = True
    return finish_bridge(bridge, hf_model, extras)


# --------------------------------------------------------------------------------------------------
# HookedTransformer


def hooked_state(hf: dict[str, Tensor], layer: int, cfg, *, fold_ln: bool) -> dict[str, Tensor]:
    """One layer's processed transformers tensors in ``HookedTransformer`` names and layouts.

    The same rearrangements as TransformerLens's ``convert_llama_weights`` (``W_Q``: heads first,
    ``(n_heads, d_model, d_head)``; ``W_O``: ``(n_heads, d_head, d_model)``; MLP weights transposed),
    made contiguous; zero biases (Llama has none).
    """
    p, b = f"model.layers.{layer}.", f"blocks.{layer}."
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    kv = "_" if cfg.n_key_value_heads is not None else ""  # GQA keys/values are "_W_K", "_W_V"

    def heads(weight: Tensor, n: int) -> Tensor:
        return einops.rearrange(weight, "(n h) m -> n m h", n=n).contiguous()

    zeros = dict(dtype=cfg.dtype)
    state = {
        b + "attn.W_Q": heads(hf.pop(p + "self_attn.q_proj.weight"), cfg.n_heads),
        b + f"attn.{kv}W_K": heads(hf.pop(p + "self_attn.k_proj.weight"), n_kv),
        b + f"attn.{kv}W_V": heads(hf.pop(p + "self_attn.v_proj.weight"), n_kv),
        b + "attn.W_O": einops.rearrange(
            hf.pop(p + "self_attn.o_proj.weight"), "m (n h) -> n h m", n=cfg.n_heads
        ).contiguous(),
        b + "attn.b_Q": torch.zeros(cfg.n_heads, cfg.d_head, **zeros),
        b + f"attn.{kv}b_K": torch.zeros(n_kv, cfg.d_head, **zeros),
        b + f"attn.{kv}b_V": torch.zeros(n_kv, cfg.d_head, **zeros),
        b + "attn.b_O": torch.zeros(cfg.d_model, **zeros),
        b + "mlp.W_in": hf.pop(p + "mlp.up_proj.weight").T.contiguous(),
        b + "mlp.W_gate": hf.pop(p + "mlp.gate_proj.weight").T.contiguous(),
        b + "mlp.W_out": hf.pop(p + "mlp.down_proj.weight").T.contiguous(),
        b + "mlp.b_in": torch.zeros(cfg.d_mlp, **zeros),
        b + "mlp.b_out": torch.zeros(cfg.d_model, **zeros),
    }
    if not fold_ln:
        state[b + "ln1.w"] = hf[p + _ATTN_NORM]
        state[b + "ln2.w"] = hf[p + _MLP_NORM]
    return state


def hooked_from_reader(
    reader: CheckpointReader,
    tokenizer: PreTrainedTokenizerBase,
    *,
    model_name: str,
    options: LoadOptions,
    extras: dict,
    progress: bool = False,
) -> HookedTransformer:
    """A ``HookedTransformer`` built on the meta device and filled layer by layer from ``reader``.

    Each block's weights go straight to the device ``HookedTransformer.forward`` expects it on
    (:func:`lens_attn.loading.devices.layer_devices`: one device, or contiguous runs of blocks
    over ``n_devices`` GPUs). ``refactor_factored_attn_matrices`` is not done here (``load_model``
    takes TransformerLens's route for it).
    """
    check_backend_available("hooked")
    cfg = hooked_config_from_hf(
        reader.config,
        model_name=model_name,
        dtype=options.dtype,
        fold_ln=options.fold_ln,
        default_prepend_bos=extras.get("default_prepend_bos"),
    )
    with empty_parameters(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "HookedTransformer is deprecated", DeprecationWarning)
        model = HookedTransformer(
            cfg,
            tokenizer=tokenizer,
            move_to_device=False,
            default_padding_side=extras.get("default_padding_side"),
        )
    model.cfg.device = str(options.device)
    model.cfg.n_devices = options.n_devices
    devices = layer_devices(model.cfg)
    assign_parameters(model, {"embed.W_E": _read(reader, EMBED, options.dtype)}, devices[0])
    unembed = read_unembed(
        reader, options.dtype, fold_ln=options.fold_ln, center_unembed=options.center_unembed
    )
    head = {"unembed.W_U": unembed.pop(LM_HEAD).T.contiguous()}
    head["unembed.b_U"] = torch.zeros(cfg.d_vocab, dtype=options.dtype)
    if not options.fold_ln:
        head["ln_final.w"] = unembed[NORM]
    assign_parameters(model, head, devices[-1])
    del head, unembed
    for layer in _layers(reader, progress=progress):
        hf = read_layer(reader, layer, options.dtype, fold_ln=options.fold_ln)
        assign_parameters(
            model, hooked_state(hf, layer, cfg, fold_ln=options.fold_ln), devices[layer]
        )
    check_all_assigned(model, source=reader.source)
    return split_across_devices(model).eval()  # buffers; the parameters are in place already
