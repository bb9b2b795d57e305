"""A checked transformers ``LlamaForCausalLM`` -> a TransformerLens model, and the check itself.

Every source ends here: ``hooked_from_hf`` builds a ``HookedTransformer`` from a config derived from
the checkpoint's own ``config.json`` with TransformerLens's ``convert_llama_weights``;
``bridge_from_hf`` wraps the HF model in a ``TransformerBridge`` in compatibility mode;
``check_against_hf`` compares the result's log-probabilities with the HF model's.
"""

import contextlib
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from lens_attn.compat import HookedTransformer, HookedTransformerConfig, check_backend_available
from lens_attn.loading.devices import split_across_devices
from lens_attn.loading.rope import hooked_rope_fields

Backend = Literal["hooked", "bridge"]


@dataclass(frozen=True)
class LoadOptions:
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
    progress: bool = False


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


def hooked_from_hf(
    hf_model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    *,
    model_name: str,
    options: LoadOptions,
    extras: dict,
) -> HookedTransformer:
    check_backend_available("hooked")
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
    with _loaded_in_one_call(model):
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


@contextlib.contextmanager
def _loaded_in_one_call(model: HookedTransformer):
    """Inside, ``model.load_state_dict(d, strict=False)`` only collects ``d``; on exit one call
    loads everything collected (same keys, same ``strict=False``).

    TransformerLens 3.9's ``load_and_process_state_dict`` loads the processed weights one key per
    call, and each call walks every module and hook point of the model: 574 calls x ~940 modules,
    5.5 s of SmolLM2-135M's load on one CPU thread. Strict or ``assign`` calls go through as they are.
    """
    collected: dict[str, Tensor] = {}
    load = model.load_state_dict

    def collect(state_dict, strict: bool = True, assign: bool = False):
        if strict or assign:
            return load(state_dict, strict=strict, assign=assign)
        collected.update(state_dict)

    model.load_state_dict = collect  # an instance attribute, shadowing the method
    try:
        yield
    finally:
        del model.load_state_dict
    load(collected, strict=False)


def bridge_from_hf(
    hf_model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    *,
    model_name: str,
    options: LoadOptions,
    extras: dict,
) -> TransformerBridge:
    if getattr(hf_model, "hf_device_map", None) is None:
        hf_model.to(options.device)
    if extras.get("default_padding_side") is not None:
        tokenizer.padding_side = extras["default_padding_side"]
    # With hf_model given, boot_transformers reads hf_model.config instead of fetching one, so the
    # name is only a label. It does not move or cast hf_model; we did.
    # Pass the device: with None, boot_transformers sets cfg.device to cuda whenever CUDA exists,
    # wherever hf_model is. A model accelerate dispatched over GPUs keeps its own placement.
    placed = getattr(hf_model, "hf_device_map", None) is not None
    bridge = TransformerBridge.boot_transformers(
        model_name,
        hf_model=hf_model,
        tokenizer=tokenizer,
        dtype=options.dtype,
        **({} if placed else {"device": str(options.device)}),
    )
    bridge.enable_compatibility_mode(
        disable_warnings=True,
        fold_ln=options.fold_ln,
        center_writing_weights=options.center_writing_weights,
        center_unembed=options.center_unembed,
        fold_value_biases=options.fold_value_biases,
        refactor_factored_attn_matrices=extras.get("refactor_factored_attn_matrices", False),
    )
    return finish_bridge(bridge, hf_model, extras)


def finish_bridge(bridge: TransformerBridge, hf_model: LlamaForCausalLM, extras: dict):
    """The bridge config fields TransformerLens doesn't set from a Llama checkpoint; in eval mode.

    TransformerLens 3.9's and 4.3's bridge config read rope_theta from a pre-transformers-5
    attribute, so it reports 10000 for any theta. Only metadata (HF's rotary module does the
    maths), but analysis code reads it: set it from the model's config.
    """
    if extras.get("default_prepend_bos") is not None:
        bridge.cfg.default_prepend_bos = extras["default_prepend_bos"]
    rope = hf_model.config.rope_parameters or {}
    bridge.cfg.rotary_base = rope.get("rope_theta", 10000.0)
    bridge.cfg.rotary_dim = bridge.cfg.d_head
    return bridge.eval()


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
