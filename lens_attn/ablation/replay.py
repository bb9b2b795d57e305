"""Run the rest of a ``HookedTransformer`` from a residual stream, unhooked, with fused attention.

    >>> tokens = model.to_tokens("The cat sat on the mat. The cat sat on the mat.")
    >>> logits, cache = model.run_with_cache(tokens)
    >>> if supports_replay(model):
    ...     final = run_from(model, cache["blocks.2.hook_resid_mid"], layer=2, at="resid_mid",
    ...                      query_from=8)
    ...     replayed = model.unembed(model.ln_final(final))    # positions 8.. only
    >>> bool(torch.allclose(replayed, logits[:, 8:], atol=1e-4))
    True

An ablation sweep runs the layers after the ablated head once per ablation, with nothing hooked in
them. TransformerLens's attention materialises the whole ``[batch, head_index, query_pos, key_pos]``
score tensor and passes over it several times (scale, causal mask, softmax, NaN guard); on the
bundled model that is 55% of a block on a CPU. Here the same maths (TransformerLens's own
projections, rotary and MLP modules) goes through ``torch.nn.functional.scaled_dot_product_attention``,
and the last layer computes only the query positions a metric reads (keys and values still come from
every position). Block for block it equals ``model.blocks[layer](resid)`` to float rounding (tested).

What it needs, and what ``run_from`` refuses without:

- a plain causal block (``supports_replay``): rotary or learned absolute positions, no attention
  soft-cap, sinks, local windows, QK norm, split or parallel inputs (Llama and GPT-2 blocks are
  plain);
- right-padded prompts (every prompt's real tokens first, as ``probes.pad`` makes them): then the
  causal mask alone keeps padding out of every real position, and rotary positions are ``0..n-1``.
  Padded positions come out as garbage that no real position reads;
- no hooks attached to the model: they would be silently skipped.
"""

from collections.abc import Callable, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from lens_attn.compat import is_hooked

# config fields whose default is the only value the replay reproduces (TransformerLens 3.9's
# AbstractAttention.forward and TransformerBlock.forward branch on each of them)
_DEFAULTS = {
    "attention_dir": "causal", "use_attn_in": False, "use_split_qkv_input": False,
    "use_qk_norm": False, "clip_qkv": None, "use_logn_attn": False, "use_dynamic_ntk_rope": False,
    "use_local_attn": False, "ungroup_grouped_query_attention": False, "parallel_attn_mlp": False,
    "use_normalization_before_and_after": False, "use_attention_sinks": False,
    "load_in_4bit": False,
}  # fmt: skip


def supports_replay(model) -> bool:
    """Whether ``run_from`` reproduces ``model``'s blocks (see the module docstring)."""
    if not is_hooked(model):  # TransformerBridge (whose blocks are HF's), or TransformerLens 4
        return False
    from transformer_lens.components import Attention, GroupedQueryAttention
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    cfg = model.cfg
    return (
        all(getattr(cfg, name, value) == value for name, value in _DEFAULTS.items())
        and cfg.positional_embedding_type in ("rotary", "standard")
        and not cfg.attn_scores_soft_cap > 0
        and cfg.original_architecture not in POST_NORM_ARCHITECTURES
        and all(type(block.attn) in (Attention, GroupedQueryAttention) for block in model.blocks)
    )


def has_hooks(model) -> bool:
    """Whether any hook point of ``model`` has a forward hook attached."""
    return any(point.has_hooks(dir="fwd") for point in model.hook_dict.values())


def is_right_padded(mask: Bool[Tensor, "batch pos"]) -> bool:
    """Every row's real tokens come first (True...True False...False)."""
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def run_from(
    model,
    resid: Float[Tensor, "batch pos d_model"],
    layer: int,
    *,
    at: Literal["resid_pre", "resid_mid"] = "resid_pre",
    query_from: int = 0,
    edit_z: "Mapping[int, Callable[[Tensor], Tensor]] | None" = None,
) -> Float[Tensor, "batch pos_out d_model"]:
    """The residual stream after the last layer, from ``blocks.{layer}.hook_{at}``.

    ``at="resid_mid"`` starts after ``layer``'s attention (its MLP comes first). The last layer
    computes only positions ``query_from..`` (``pos_out = pos - query_from``), so the result is what
    ``model(..., stop_at_layer=None)`` holds before ``ln_final`` at those positions.

    ``edit_z`` maps layers still to run to a function of their ``hook_z``
    (``[batch, pos, head_index, d_head]``, every position) returning the ``z`` to use instead, as
    a hook on ``blocks.{l}.attn.hook_z`` would (an ablation of heads in several layers).
    """
    if not supports_replay(model):
        raise ValueError(
            "replay only reproduces plain causal blocks (supports_replay(model) is False); "
            "run the model itself instead"
        )
    if has_hooks(model):
        raise ValueError("the model has hooks attached; replay would skip them: remove them first")
    if at not in ("resid_pre", "resid_mid"):
        raise ValueError(f"unknown start site at={at!r}; valid: resid_pre, resid_mid")
    edit_z = edit_z or {}
    last = model.cfg.n_layers - 1
    first_attention = layer if at == "resid_pre" else layer + 1
    if any(not first_attention <= i <= last for i in edit_z):
        raise ValueError(
            f"edit_z has layers {sorted(edit_z)}; valid: the attention layers still to run from "
            f"{at} of layer {layer}, {first_attention}..{last}"
        )
    lo = 0  # positions already cut from the front
    for i in range(layer, last + 1):
        block = model.blocks[i]
        resid = resid.to(_device(block))  # blocks split over devices: TL moves it the same way
        if i == last and last not in edit_z:  # an edited z needs every position
            lo = query_from
        if i >= first_attention:
            x = block.ln1(resid)
            resid = resid[:, lo:] + attention(block.attn, x, query_from=lo, edit_z=edit_z.get(i))
        else:
            resid = resid[:, lo:]
        if not model.cfg.attn_only:
            resid = resid + mlp_out(block.mlp, block.ln2(resid))
    return resid[:, query_from - lo :]


def mlp_out(mlp, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
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


def unembed(model, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
    """``model.unembed(x)``; for TransformerLens's ``Unembed`` as one matmul, without the copy of
    ``W_U``'s transpose its 3.9 forward makes on every call (``d_model * d_vocab`` floats)."""
    if not is_hooked(model):  # TransformerBridge; TransformerLens 4 has no ``components``
        return model.unembed(x)
    from transformer_lens.components import Unembed

    if type(model.unembed) is Unembed:
        return x @ model.unembed.W_U + model.unembed.b_U
    return model.unembed(x)


def _device(module) -> torch.device:
    return next(module.parameters()).device


def qkv(
    attn, x: Float[Tensor, "batch pos d_model"], attention_mask: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys and values of ``attn`` on normalised input ``x``, rotary applied, keys and
    values repeated to the query heads (GQA) as TransformerLens does: each
    ``[batch, head_index, pos, d_head]``. ``attention_mask`` sets rotary positions as TL does."""
    q, k, v = attn.calculate_qkv_matrices(x, x, x)  # [batch, pos, head_index | kv_head, d_head]
    if attn.cfg.positional_embedding_type == "rotary":
        q, k = attn.apply_rotary(q, 0, attention_mask), attn.apply_rotary(k, 0, attention_mask)
    repeat = q.shape[2] // k.shape[2]  # GQA: query heads per key/value head
    if repeat > 1:
        k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def attention(
    attn,
    x: Float[Tensor, "batch pos d_model"],
    *,
    query_from: int = 0,
    edit_z: "Callable[[Tensor], Tensor] | None" = None,
) -> Float[Tensor, "batch query_pos d_model"]:
    """``attn``'s output (``hook_attn_out``) on normalised input ``x`` for queries ``query_from..``.

    ``edit_z`` replaces ``hook_z`` ``[batch, pos, head_index, d_head]`` before ``W_O`` (every
    query position: ``query_from`` must be 0). Right-padded input only (module docstring): no
    attention mask is applied beyond causality.
    """
    if edit_z is not None and query_from:
        raise ValueError("edit_z sees hook_z at every position; it needs query_from=0")
    q, k, v = qkv(attn, x)
    q = q[:, :, query_from:]
    if query_from:  # queries query_from.. see keys 0..query_pos
        n = x.shape[1]
        visible = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()[query_from:]
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=1 / attn.attn_scale)
    else:
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1 / attn.attn_scale)
    z = z.transpose(1, 2)  # [batch, query_pos, head_index, d_head]
    if edit_z is not None:
        z = edit_z(z)
    return torch.einsum("bqhd,hdm->bqm", z, attn.W_O) + attn.b_O


def attention_z(block, resid_pre: Tensor, mask: Tensor) -> Tensor:
    """``hook_z`` ``[batch, pos, head_index, d_head]`` of ``block``'s attention on ``resid_pre``."""
    q, k, v = qkv(block.attn, block.ln1(resid_pre), mask.long())
    pattern = softmax_causal(q @ k.transpose(-1, -2) / block.attn.attn_scale, mask)
    return (pattern @ v).permute(0, 2, 1, 3)


@torch.no_grad()
def pattern_from(attn, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rotary ``q``, ``k`` (query heads) and the causal pattern of ``attn`` on normalised input ``x``."""
    q, k, _ = qkv(attn, x, mask.long())
    return q, k, softmax_causal(q @ k.transpose(-1, -2) / attn.attn_scale, mask)


def softmax_causal(scores: Tensor, mask: Tensor) -> Tensor:
    n = scores.shape[-1]
    visible = (
        torch.ones(n, n, dtype=torch.bool, device=scores.device).tril() & mask[:, None, None, :]
    )
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
