"""The one accessor that reads attention, norm and unembedding weights, for either backend.

``HookedTransformer`` (TransformerLens 3.9) folds the RMSNorm weights into ``W_Q``/``W_K``/``W_V``
(``ln1`` is ``RMSNormPre``) and keeps the key/value weights of grouped-query attention in ``_W_K`` /
``_W_V`` (``W_K`` repeats them to the query heads); ``TransformerBridge`` keeps the norm weight in
``ln1`` and ``W_K`` per key/value head. :func:`attention_weights` returns both as the same
:class:`AttentionWeights`, keys and values per *key/value* head, so that a path into one query
head's keys is computed with that head's own ``k`` and never touches the query heads sharing it.

Rotary angles come from the model itself: ``attn.rotary_cos``/``rotary_sin`` (HookedTransformer)
or the ``hook_cos``/``hook_sin`` the bridge's attention emits (captured in the cached pass;
:func:`rotary_hook_names`). ``tests/test_circuit.py`` checks that a clean recompute from these
weights reproduces every head's ``hook_pattern`` on both backends.
"""

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from lens_attn.compat import is_hooked
from lens_attn.errors import InputError


@dataclass(frozen=True)
class AttentionWeights:
    """One layer's attention weights; keys/values per key/value head (``kv_head``)."""

    W_Q: Float[Tensor, "head_index d_model d_head"]
    W_K: Float[Tensor, "kv_head d_model d_head"]
    W_V: Float[Tensor, "kv_head d_model d_head"]
    W_O: Float[Tensor, "head_index d_head d_model"]
    b_Q: Float[Tensor, "head_index d_head"]
    b_K: Float[Tensor, "kv_head d_head"]
    b_V: Float[Tensor, "kv_head d_head"]
    norm: Float[Tensor, " d_model"] | None  # ln1's weight; None where it is folded into W_Q/K/V
    eps: float
    attn_scale: float  # scores are q.k / attn_scale

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without GQA)."""
        return self.W_Q.shape[0] // self.W_K.shape[0]

    def kv_head(self, head: int) -> int:
        return head // self.group_size


def _check_rms(model) -> None:
    kind = getattr(model.cfg, "normalization_type", None)
    if kind not in ("RMS", "RMSPre"):
        raise InputError(
            f"circuit() recomputes RMSNorm (Llama-family models); this model's normalization_type "
            f"is {kind!r}; valid: 'RMS', 'RMSPre'"
        )


def norm_weight(norm) -> Tensor | None:
    """The weight of an RMSNorm module (TransformerLens ``w``, a bridge's wrapped ``weight``), or
    None for ``RMSNormPre`` (folded)."""
    for owner in (norm, getattr(norm, "_original_component", None)):
        for name in ("w", "weight"):
            weight = getattr(owner, name, None) if owner is not None else None
            if isinstance(weight, Tensor):
                return weight.detach()
    return None


def _bias(attn, name: str, n: int, d_head: int, like: Tensor) -> Tensor:
    bias = getattr(attn, name, None)
    if not isinstance(bias, Tensor):
        return torch.zeros(n, d_head, dtype=like.dtype, device=like.device)
    return bias.detach()[:n] if bias.shape[0] == n else bias.detach()


def attention_weights(model, layer: int) -> AttentionWeights:
    """``model.blocks[layer]``'s attention weights, read the same way for both backends."""
    _check_rms(model)
    attn = model.blocks[layer].attn
    cfg = model.cfg
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    W_Q = attn.W_Q.detach()
    # HookedTransformer's GQA keeps per-kv-head weights in _W_K/_W_V (W_K repeats them)
    W_K = getattr(attn, "_W_K", None) if is_hooked(model) else None
    W_V = getattr(attn, "_W_V", None) if is_hooked(model) else None
    W_K = (attn.W_K if W_K is None else W_K).detach()
    W_V = (attn.W_V if W_V is None else W_V).detach()
    if W_K.shape[0] != n_kv:  # an expanded view: take one query head per kv head
        W_K, W_V = W_K[:: W_K.shape[0] // n_kv], W_V[:: W_V.shape[0] // n_kv]
    b_K = getattr(attn, "_b_K", None) if is_hooked(model) else None
    b_V = getattr(attn, "_b_V", None) if is_hooked(model) else None
    d_head = W_Q.shape[-1]
    if not isinstance(b_K, Tensor):
        b_K = _bias(attn, "b_K", n_kv, d_head, W_Q)
        b_K = b_K[:: b_K.shape[0] // n_kv] if b_K.shape[0] != n_kv else b_K
    if not isinstance(b_V, Tensor):
        b_V = _bias(attn, "b_V", n_kv, d_head, W_Q)
        b_V = b_V[:: b_V.shape[0] // n_kv] if b_V.shape[0] != n_kv else b_V
    scale = getattr(attn, "attn_scale", None)
    if not isinstance(scale, (int, float)):
        scale = d_head**0.5 if getattr(cfg, "use_attn_scale", True) else 1.0
    return AttentionWeights(
        W_Q=W_Q,
        W_K=W_K,
        W_V=W_V,
        W_O=attn.W_O.detach(),
        b_Q=_bias(attn, "b_Q", cfg.n_heads, d_head, W_Q),
        b_K=b_K.detach(),
        b_V=b_V.detach(),
        norm=norm_weight(model.blocks[layer].ln1),
        eps=float(getattr(cfg, "eps", 1e-5)),
        attn_scale=float(scale),
    )


def final_norm_weight(model) -> Tensor | None:
    """``ln_final``'s weight, or None where it is folded into ``W_U``."""
    _check_rms(model)
    return norm_weight(model.ln_final)


def unembedding(model) -> Float[Tensor, "d_model d_vocab"]:
    return model.W_U.detach()


def rms_norm(
    x: Float[Tensor, "... d_model"], weight: Tensor | None, eps: float
) -> Float[Tensor, "... d_model"]:
    """RMSNorm as Llama (and TransformerLens's ``RMSNorm``/``RMSNormPre``) computes it."""
    out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return out if weight is None else out * weight


def rotary_hook_names(model, layers) -> list[str]:
    """Hooks to cache for :func:`rotary_angles` (the bridge's ``hook_cos``/``hook_sin``)."""
    if is_hooked(model) or model.cfg.positional_embedding_type != "rotary":
        return []
    return [f"blocks.{layer}.attn.hook_{n}" for layer in layers for n in ("cos", "sin")]


def rotary_angles(
    model, layer: int, n_pos: int, cache=None
) -> tuple[Float[Tensor, "pos rotary_dim"], Float[Tensor, "pos rotary_dim"]] | None:
    """``cos``, ``sin`` of ``layer``'s rotary embedding at positions ``0..n_pos-1`` (None: no
    rotary). ``cache`` holds the bridge's ``hook_cos``/``hook_sin`` (:func:`rotary_hook_names`)."""
    if model.cfg.positional_embedding_type != "rotary":
        return None
    if getattr(model.cfg, "rotary_adjacent_pairs", False):
        raise InputError(
            "circuit() applies rotary embeddings in rotate-half order (Hugging Face Llama); this "
            "model rotates adjacent pairs (rotary_adjacent_pairs=True); valid: rotate-half models"
        )
    attn = model.blocks[layer].attn
    if is_hooked(model):
        return attn.rotary_cos[:n_pos].detach(), attn.rotary_sin[:n_pos].detach()
    cos, sin = cache[f"blocks.{layer}.attn.hook_cos"], cache[f"blocks.{layer}.attn.hook_sin"]
    return cos.reshape(-1, cos.shape[-1])[:n_pos], sin.reshape(-1, sin.shape[-1])[:n_pos]


def apply_rotary(
    x: Float[Tensor, "... pos d_head"], angles: tuple[Tensor, Tensor] | None
) -> Float[Tensor, "... pos d_head"]:
    """Rotate-half rotary embedding (HF Llama, TransformerLens with ``rotary_adjacent_pairs=False``)
    of the first ``rotary_dim`` dimensions."""
    if angles is None:
        return x
    cos, sin = angles
    dim = cos.shape[-1]
    rot, rest = x[..., :dim], x[..., dim:]
    half = dim // 2
    flipped = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * cos + flipped * sin, rest], dim=-1)
