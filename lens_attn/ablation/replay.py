"""Run the rest of a model from a residual stream, unhooked, with fused attention.

    >>> tokens = model.to_tokens("The cat sat on the mat. The cat sat on the mat.")
    >>> logits, cache = model.run_with_cache(tokens)
    >>> print(replay_blocker(model))   # else one line: why not (the sweep falls back to resume)
    None
    >>> final = run_from(model, cache["blocks.2.hook_resid_mid"], layer=2, at="resid_mid",
    ...                  query_from=8)
    >>> replayed = model.unembed(model.ln_final(final))    # positions 8.. only
    >>> bool(torch.allclose(replayed, logits[:, 8:], atol=1e-4))
    True

An ablation sweep runs the layers after the ablated head once per ablation, with nothing hooked in
them. TransformerLens's attention materialises the whole ``[batch, head_index, query_pos, key_pos]``
score tensor and passes over it several times (scale, causal mask, softmax, NaN guard); on the
bundled model that is 55% of a block on a CPU; a ``TransformerBridge``'s reimplemented attention does
the same. Here the same maths (the model's own projections, rotary and MLP modules, read through
``lens_attn.blocks``, so a ``HookedTransformer`` and a ``TransformerBridge`` alike) goes through
``torch.nn.functional.scaled_dot_product_attention``,
and the last layer computes only the query positions a metric reads (keys and values still come from
every position). Block for block it equals ``model.blocks[layer](resid)`` to float rounding (tested).

What it needs, and what ``run_from`` refuses without:

- a plain causal block (``supports_replay``; ``replay_blocker`` says why not in one line):
  ``HookedTransformer``: rotary or learned absolute positions, no attention soft-cap, sinks, local
  windows, QK norm, split or parallel inputs (Llama and GPT-2 blocks are plain);
  ``TransformerBridge``: rotary attention with separate q/k/v projections (TransformerLens's
  ``PositionEmbeddingsAttentionBridge``: Llama, Qwen2, Mistral, Gemma 1) in pre-norm blocks, none
  of the above extras;
- right-padded prompts (every prompt's real tokens first, as ``probes.pad`` makes them): then the
  causal mask alone keeps padding out of every real position, and rotary positions are ``0..n-1``.
  Padded positions come out as garbage that no real position reads;
- no hooks attached to the model: they would be silently skipped.
"""

from collections.abc import Callable, Mapping
from typing import Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from lens_attn.blocks import BlockView, block_view, replay_blocker, sdpa
from lens_attn.blocks import unembed as unembed  # re-exported: the sweep's unembedding


def supports_replay(model) -> bool:
    """Whether ``run_from`` reproduces ``model``'s blocks (``replay_blocker(model)`` says why not)."""
    return replay_blocker(model) is None


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
    blocker = replay_blocker(model)
    if blocker is not None:
        raise ValueError(
            f"replay can't reproduce this model's blocks: {blocker} (supports_replay(model) is "
            "False); run the model itself instead"
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
        view = block_view(model, i)
        resid = resid.to(view.W_O.device)  # blocks split over devices: TL moves it the same way
        if i == last and last not in edit_z:  # an edited z needs every position
            lo = query_from
        if i >= first_attention:
            x = view.ln1(resid)
            resid = resid[:, lo:] + attention(view, x, query_from=lo, edit_z=edit_z.get(i))
        else:
            resid = resid[:, lo:]
        if not model.cfg.attn_only:
            resid = resid + view.mlp(view.ln2(resid))
    return resid[:, query_from - lo :]


def attention(
    view: BlockView,
    x: Float[Tensor, "batch pos d_model"],
    *,
    query_from: int = 0,
    edit_z: "Callable[[Tensor], Tensor] | None" = None,
) -> Float[Tensor, "batch query_pos d_model"]:
    """The layer's attention output (``hook_attn_out``) on normalised input ``x`` for queries
    ``query_from..``; ``view`` from ``lens_attn.blocks.block_view(model, layer)``.

    ``edit_z`` replaces ``hook_z`` ``[batch, pos, head_index, d_head]`` before ``W_O`` (every
    query position: ``query_from`` must be 0). Right-padded input only (module docstring): no
    attention mask is applied beyond causality.
    """
    if edit_z is not None and query_from:
        raise ValueError("edit_z sees hook_z at every position; it needs query_from=0")
    q, k, v = view.qkv(x)
    z = sdpa(q[:, :, query_from:], k, v, view.attn_scale, query_from)
    z = z.transpose(1, 2)  # [batch, query_pos, head_index, d_head]
    if edit_z is not None:
        z = edit_z(z)
    return view.out(z)


def attention_z(view: BlockView, resid_pre: Tensor, mask: Tensor) -> Tensor:
    """``hook_z`` ``[batch, pos, head_index, d_head]`` of the layer's attention on ``resid_pre``."""
    q, k, v = view.qkv(view.ln1(resid_pre), mask.long())
    pattern = softmax_causal(q @ k.transpose(-1, -2) / view.attn_scale, mask)
    return (pattern @ v).permute(0, 2, 1, 3)


@torch.no_grad()
def pattern_from(view: BlockView, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rotary ``q``, ``k`` (query heads) and the causal pattern of the layer on normalised input ``x``."""
    q, k, _ = view.qkv(x, mask.long())
    return q, k, softmax_causal(q @ k.transpose(-1, -2) / view.attn_scale, mask)


def softmax_causal(scores: Tensor, mask: Tensor) -> Tensor:
    n = scores.shape[-1]
    visible = (
        torch.ones(n, n, dtype=torch.bool, device=scores.device).tril() & mask[:, None, None, :]
    )
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
