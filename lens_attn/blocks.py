"""One layer of a ``HookedTransformer`` or a ``TransformerBridge``, seen the same way by both.

The fast paths (the replay sweep, chunked scoring, attribution's ``qk_fix`` and ``margin``)
recompute parts of a layer outside the model's own forward. They read the layer through this
adapter, so they don't care which backend they got:

    >>> _, cache = model.run_with_cache(model.to_tokens("The cat sat on the mat."))
    >>> view = block_view(model, 2)
    >>> q, k, v = view.qkv(view.ln1(cache["blocks.2.hook_resid_pre"]))  # rotary applied, and
    >>> q.shape == k.shape == v.shape   # key/value heads repeated to the query heads (GQA)
    True
    >>> view.W_O.shape                  # [head_index, d_head, d_model]
    torch.Size([8, 16, 128])
    >>> replay_blocker(model) is None   # else one line: why these blocks can't be recomputed
    True

==============  ==========================================================================
``ln1, ln2``    the block's two norms (unhooked on a ``HookedTransformer``; the bridge's own
                modules, whose hook points then cost a call each but do nothing)
``qkv(x)``      queries, keys, values from normalised input, positions ``0..pos-1`` (or from an
                attention mask, hooked only: TransformerLens's rotary offsets)
``attn_scale``  scores are ``q @ k.T / attn_scale``
``W_O, b_O``    ``[head_index, d_head, d_model]`` and ``[d_model]`` (zeros where the model has none)
``mlp(x)``      the block's MLP output
==============  ==========================================================================

Where the weights come from. ``HookedTransformer``: its components (``calculate_qkv_matrices``,
``apply_rotary``, ``W_O``). ``TransformerBridge``: the transformers modules inside it, which hold the
processed weights (``fold_ln`` etc. are written into them): ``q_proj``/``k_proj``/``v_proj``/``o_proj``
as plain ``nn.Linear``, cos/sin from the model's rotary module, rotated as the bridge rotates them
(transformers' Llama ``apply_rotary_pos_emb``, which TransformerLens's
``PositionEmbeddingsAttentionBridge`` uses for every rotary architecture it reimplements).

``replay_blocker(model)`` says, in one line, why a model's blocks can't be recomputed this way
(``None`` when they can): the paths that need it fall back and report that reason.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from lens_attn.compat import is_hooked

# HookedTransformer config fields whose default is the only value the recomputation reproduces
# (TransformerLens 3.9's AbstractAttention.forward and TransformerBlock.forward branch on each)
_HOOKED_DEFAULTS = {
    "attention_dir": "causal", "use_attn_in": False, "use_split_qkv_input": False,
    "use_qk_norm": False, "clip_qkv": None, "use_logn_attn": False, "use_dynamic_ntk_rope": False,
    "use_local_attn": False, "ungroup_grouped_query_attention": False, "parallel_attn_mlp": False,
    "use_normalization_before_and_after": False, "use_attention_sinks": False,
    "load_in_4bit": False,
}  # fmt: skip

# a bridge block holds exactly these submodules when it is pre-norm, attention then MLP
# (Llama, Qwen2, Mistral, Gemma 1); Gemma 2/3's extra norms and parallel blocks add others
_PLAIN_BRIDGE_BLOCK = {"ln1", "ln2", "attn", "mlp"}


@dataclass(frozen=True)
class BlockView:
    """One layer's computation, read the same way from either backend (module docstring)."""

    layer: int
    ln1: Callable[[Tensor], Tensor]
    ln2: Callable[[Tensor], Tensor]
    mlp: Callable[[Tensor], Tensor]
    W_O: Float[Tensor, "head_index d_head d_model"]
    b_O: Float[Tensor, " d_model"]
    attn_scale: float
    _qkv: Callable[..., tuple[Tensor, Tensor, Tensor]]
    _scaling: float | None = None  # a bridge's multiplier (HF's ``scaling``), used as it is

    def scale_scores(self, scores: Tensor) -> Tensor:
        """``q @ k.T`` to attention scores, in place, rounded as the model's own forward rounds
        them (TransformerLens divides by ``attn_scale``; a bridge multiplies by HF's ``scaling``)."""
        if self._scaling is not None:
            return scores.mul_(self._scaling)
        return scores.div_(self.attn_scale)

    def qkv(
        self,
        x: Float[Tensor, "batch pos d_model"],
        attention_mask: Tensor | None = None,
        *,
        fire_hooks: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``q, k, v`` ``[batch, head_index, pos, d_head]`` on normalised input ``x``: rotary
        applied, key/value heads repeated to the query heads as TransformerLens does (GQA).

        ``fire_hooks``: project through the model's own modules so ``hook_q``/``hook_k``/``hook_v``
        fire (always so on a ``HookedTransformer``, whose projections are its hooked modules)."""
        q, k, v = self._qkv(x, attention_mask, fire_hooks)  # [batch, pos, head | kv_head, d_head]
        repeat = q.shape[2] // k.shape[2]
        if repeat > 1:
            k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def out(
        self, z: Float[Tensor, "batch pos head_index d_head"]
    ) -> Float[Tensor, "batch pos d_model"]:
        """``hook_attn_out`` from ``hook_z``."""
        return torch.einsum("bqhd,hdm->bqm", z, self.W_O) + self.b_O


def replay_blocker(model) -> str | None:
    """Why ``block_view``'s recomputation would not reproduce ``model``'s blocks; ``None`` if it does."""
    if is_hooked(model):
        return _hooked_blocker(model)
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:  # pragma: no cover - every supported TransformerLens has the bridge
        TransformerBridge = ()
    if not isinstance(model, TransformerBridge):
        return f"a {type(model).__name__} is neither a HookedTransformer nor a TransformerBridge"
    return _bridge_blocker(model)


def block_view(model, layer: int) -> BlockView:
    """The adapter for ``model.blocks[layer]`` (refuses a model ``replay_blocker`` refuses)."""
    if is_hooked(model):
        return _hooked_view(model, layer)
    return _bridge_view(model, layer)


def unembed(model, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
    """``model.unembed(x)``; for TransformerLens's ``Unembed`` as one matmul, without the copy of
    ``W_U``'s transpose its 3.9 forward makes on every call (``d_model * d_vocab`` floats)."""
    if not is_hooked(model):  # TransformerBridge; TransformerLens 4 has no ``components``
        original = getattr(model.unembed, "original_component", None)
        return original(x) if isinstance(original, torch.nn.Linear) else model.unembed(x)
    from transformer_lens.components import Unembed

    if type(model.unembed) is Unembed:
        return x @ model.unembed.W_U + model.unembed.b_U
    return model.unembed(x)


# HookedTransformer ---------------------------------------------------------------------------


def _hooked_blocker(model) -> str | None:
    from transformer_lens.components import Attention, GroupedQueryAttention
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    cfg = model.cfg
    changed = [
        name for name, value in _HOOKED_DEFAULTS.items() if getattr(cfg, name, value) != value
    ]
    if changed:
        return f"its config sets {', '.join(changed)}"
    if cfg.positional_embedding_type not in ("rotary", "standard"):
        return (
            f"positional_embedding_type={cfg.positional_embedding_type!r} (rotary or standard only)"
        )
    if cfg.attn_scores_soft_cap > 0:
        return "its attention scores are soft-capped"
    if cfg.original_architecture in POST_NORM_ARCHITECTURES:
        return f"{cfg.original_architecture} blocks normalise after attention"
    for layer, block in enumerate(model.blocks):
        if type(block.attn) not in (Attention, GroupedQueryAttention):
            return f"blocks.{layer}.attn is a {type(block.attn).__name__}"
    return None


def _hooked_view(model, layer: int) -> BlockView:
    block = model.blocks[layer]
    attn = block.attn

    def qkv(x, attention_mask=None, fire_hooks=False):
        q, k, v = attn.calculate_qkv_matrices(x, x, x)
        if attn.cfg.positional_embedding_type == "rotary":
            q, k = attn.apply_rotary(q, 0, attention_mask), attn.apply_rotary(k, 0, attention_mask)
        return q, k, v

    return BlockView(
        layer=layer, ln1=block.ln1, ln2=block.ln2, mlp=functools.partial(_hooked_mlp, block.mlp),
        W_O=attn.W_O, b_O=attn.b_O, attn_scale=float(attn.attn_scale), _qkv=qkv,
    )  # fmt: skip


def _hooked_mlp(mlp, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
    """``mlp(x)`` unhooked; TransformerLens's gated MLP (Llama's) as plain matmuls.

    TransformerLens 3.9's ``GatedMLP.forward`` copies each weight to a contiguous transpose on
    every call (for bfloat16 parity with Hugging Face), about a tenth of its time on a CPU; the
    matmuls below read the weights as they are. Other MLPs run as they are.
    """
    from transformer_lens.components.mlps.gated_mlp import GatedMLP

    if type(mlp) is not GatedMLP or mlp.cfg.is_layer_norm_activation():
        return mlp(x)
    hidden = mlp.act_fn(x @ mlp.W_gate) * (x @ mlp.W_in) + mlp.b_in  # [batch, pos, d_mlp]
    return hidden @ mlp.W_out + mlp.b_out


# TransformerBridge ---------------------------------------------------------------------------


def _bridge_blocker(model) -> str | None:
    from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
        PositionEmbeddingsAttentionBridge,
    )

    cfg = model.cfg
    flags = ("use_split_qkv_input", "use_attn_in", "gated_q_proj", "rotary_interleaved_cos_sin",
             "rotary_adjacent_pairs", "qk_norm_after_rope", "parallel_attn_mlp")  # fmt: skip
    changed = [name for name in flags if getattr(cfg, name, False)]
    if changed:
        return f"its config sets {', '.join(changed)}"
    if getattr(model, "rotary_emb", None) is None:
        return (
            f"no rotary attention: replay recomputes rotary attention only "
            f"({_architecture(model)} adds learned positions before the first block)"
        )
    for layer, block in enumerate(model.blocks):
        attn = block.attn
        if type(attn) is not PositionEmbeddingsAttentionBridge:
            return (
                f"blocks.{layer}.attn is a {type(attn).__name__} (replay recomputes "
                "PositionEmbeddingsAttentionBridge: rotary, separate q/k/v projections)"
            )
        extra = {name for name, _ in block.named_children()} - _PLAIN_BRIDGE_BLOCK
        extra = {name for name in extra if not name.startswith(("hook", "_original"))}
        if extra:
            return f"blocks.{layer} has {', '.join(sorted(extra))} besides ln1, attn, ln2, mlp"
        hf = attn.original_component
        hf_config = getattr(hf, "config", None)
        checks = {
            "QK-norm": "q_norm" in attn.submodules or "k_norm" in attn.submodules,
            "a key multiplier": getattr(hf, "key_multiplier", None) is not None,
            "attention sinks": getattr(hf, "sinks", None) is not None,
            "soft-capped scores": getattr(hf, "attn_logit_softcapping", None) is not None,
            "a sliding window": getattr(hf, "sliding_window", None) is not None,
            "clip_qkv": getattr(hf_config, "clip_qkv", None) is not None,
            "Llama 4 attention scaling": (
                isinstance(getattr(hf_config, "rope_parameters", None), dict)
                and hf_config.rope_parameters.get("llama_4_scaling_beta") is not None
            ),
        }
        bad = [name for name, is_bad in checks.items() if is_bad]
        if bad:
            return f"blocks.{layer}.attn has {', '.join(bad)}"
        for name in ("q", "k", "v", "o"):
            if not isinstance(getattr(attn, name).original_component, torch.nn.Linear):
                return f"blocks.{layer}.attn.{name} is not a torch Linear"
    if getattr(model.cfg, "rotary_dim", None) not in (None, model.cfg.d_head):
        return f"partial rotary (rotary_dim={model.cfg.rotary_dim}, d_head={model.cfg.d_head})"
    return None


def _architecture(model) -> str:
    from lens_attn.compat import architecture

    return architecture(model.cfg) or type(model).__name__


def _bridge_view(model, layer: int) -> BlockView:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    block = model.blocks[layer]
    attn = block.attn
    hf = attn.original_component
    q_proj, k_proj, v_proj, o_proj = (getattr(attn, n).original_component for n in "qkvo")
    d_head = hf.head_dim
    rotary = model.rotary_emb.original_component

    def qkv(x, attention_mask=None, fire_hooks=False):
        batch, pos, _ = x.shape
        project = (attn.q, attn.k, attn.v) if fire_hooks else (q_proj, k_proj, v_proj)
        q, k, v = (linear(x).view(batch, pos, -1, d_head) for linear in project)
        position_ids = torch.arange(pos, device=x.device)[None]
        cos, sin = rotary(x, position_ids)  # [1, pos, d_head]
        # apply_rotary_pos_emb takes [batch, head, pos, d_head] (unsqueeze_dim=1)
        q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v

    n_heads = model.cfg.n_heads
    w_o = o_proj.weight.T.reshape(n_heads, d_head, -1)  # o_proj reads heads head-major
    b_o = o_proj.bias if o_proj.bias is not None else torch.zeros_like(o_proj.weight[:, 0])
    return BlockView(
        layer=layer, ln1=block.ln1, ln2=block.ln2, mlp=block.mlp, W_O=w_o, b_O=b_o,
        attn_scale=1 / float(hf.scaling), _qkv=qkv, _scaling=float(hf.scaling),
    )  # fmt: skip


def sdpa(q: Tensor, k: Tensor, v: Tensor, attn_scale: float, query_from: int = 0) -> Tensor:
    """Causal attention of queries ``query_from..`` (``q`` holds only those) over every key."""
    if query_from:
        n = k.shape[2]
        visible = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()[query_from:]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=1 / attn_scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1 / attn_scale)
