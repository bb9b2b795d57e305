"""Query-chunked attention for long prompts: score heads without ever building a ``[T, T]`` pattern.

A layer's pattern is ``[batch, head_index, T, T]``: 2 GB at T=4096 for 32 heads in float32, growing
with T². ``score_heads(..., query_chunk=C)`` swaps each attention module's forward, for the duration
of the pass, for one that computes the pattern in blocks of ``C`` query rows from ``hook_rot_q`` /
``hook_rot_k`` (rotary applied, GQA key/value heads expanded), hands each block to the scores, and
uses the same block for ``z = pattern @ v``. Peak memory grows with ``C * T``.

What differs from the normal forward: ``hook_attn_scores`` and ``hook_pattern`` do not fire (no
full pattern exists), so hooks on them are refused; every other hook (``hook_q``, ``hook_rot_k``,
``hook_z``, ``hook_result``, ``resid_post`` ...) fires as usual. Supported: ``HookedTransformer``
with causal attention and rotary or no positional terms inside attention (Llama and most decoders),
without ALiBi, soft-capping, attention sinks, OLMo's QK-norm or a KV cache. A model split over
several GPUs works: each layer's blocks are computed on that layer's device.

On a ``TransformerBridge`` the swapped forward reads the layer through ``lens_attn.blocks`` (the
bridges ``replay_blocker`` accepts: rotary attention with separate q/k/v projections, e.g. Llama,
Qwen2, Gemma 1; others are refused with the reason). ``hook_q``/``hook_k``/``hook_v``, ``hook_z``
and ``hook_attn_out`` fire; ``hook_rot_q``/``hook_rot_k`` (and cos/sin) do not, so hooks on them
are refused too.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from lens_attn.blocks import block_view, replay_blocker
from lens_attn.compat import architecture, is_hooked
from lens_attn.errors import InputError

Blocks = Iterator[tuple[int, Float[Tensor, "batch head_index rows key_pos"]]]

# TransformerLens applies these architectures' QK-norm inside Attention.forward, not in
# calculate_qkv_matrices, so the chunked forward would skip it.
_OLMO_QK_NORM = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


def check_chunk(query_chunk: int, longest: int, analyses) -> None:
    """Refuse a chunk size outside ``1..T`` and analyses that can't take a block of query rows."""
    is_int = isinstance(query_chunk, int) and not isinstance(query_chunk, bool)
    if not is_int or not 1 <= query_chunk <= longest:
        raise ValueError(
            f"query_chunk must be an integer from 1 to the prompt length T={longest}, "
            f"got {query_chunk!r}"
        )
    for analysis in analyses:
        only_pattern = tuple(analysis.hooks) == ("pattern",)
        if "pattern" in analysis.hooks and not (analysis.chunkable and only_pattern):
            raise ValueError(
                f"analysis {analysis.name!r} can't run with query_chunk: chunked scoring needs "
                "analyses that read only 'pattern' and accept a block of query rows "
                "(chunkable=True)"
            )


def _check_model(model) -> None:
    if not is_hooked(model):
        why = replay_blocker(model)
        if why is not None:
            raise InputError(
                f"query_chunk recomputes each layer's attention, which lens-attn can't reproduce "
                f"for this model ({why}); without query_chunk, score_heads runs on it"
            )
        _check_hooks(model, ("hook_pattern", "hook_attn_scores", "hook_rot_q", "hook_rot_k"))
        return
    cfg = model.cfg
    unsupported = {
        "positional_embedding_type": cfg.positional_embedding_type
        in ("alibi", "relative_positional_bias"),
        "attention_dir": cfg.attention_dir != "causal",
        "attn_scores_soft_cap": (cfg.attn_scores_soft_cap or 0) > 0,
        "use_attention_sinks": bool(getattr(cfg, "use_attention_sinks", False)),
        "use_logn_attn": bool(getattr(cfg, "use_logn_attn", False)),
        "clip_qkv": getattr(cfg, "clip_qkv", None) is not None,
        "load_in_4bit": bool(getattr(cfg, "load_in_4bit", False)),
        "use_split_qkv_input": bool(cfg.use_split_qkv_input),
        "QK-norm": architecture(cfg) in _OLMO_QK_NORM,  # applied inside TL's forward only
    }
    bad = [name for name, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ValueError(f"query_chunk does not support this model's {', '.join(bad)}")
    _check_hooks(model, ("hook_pattern", "hook_attn_scores"))


def _check_hooks(model, unfired: tuple[str, ...]) -> None:
    """Refuse a swapped forward already in place, and hooks on the points it never fires."""
    for layer, block in enumerate(model.blocks):
        if "forward" in vars(block.attn):
            raise ValueError(
                f"layer {layer}'s attention forward is already replaced (nested chunked_attention?)"
            )
        for hook in (getattr(block.attn, name) for name in unfired):
            if hook.has_hooks(dir="fwd"):
                raise ValueError(
                    f"{hook.name} has hooks attached; with query_chunk layer {layer}'s attention "
                    "is recomputed without firing it (the full pattern is never built), so they "
                    "would not run. Remove them or drop query_chunk"
                )


def _blocks(
    scale: Callable[[Tensor], Tensor],
    ignore,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    z: Tensor,
    chunk: int,
    attention_mask,
) -> Blocks:
    """Yield ``(query_start, pattern block)`` and fill ``z`` for each block's rows; ``scale``
    turns ``q @ k`` into scores in place, as the model's own forward does."""
    n_pos = q.shape[2]
    keys = torch.arange(n_pos, device=q.device)
    if attention_mask is not None:  # [batch, key_pos], on the first layer's device
        attention_mask = attention_mask.to(q.device).bool()[:, None, None, :]
    for start in range(0, n_pos, chunk):
        stop = min(n_pos, start + chunk)
        rows = torch.arange(start, stop, device=q.device)
        visible = keys[None, :] <= rows[:, None]  # [rows, key_pos]
        if attention_mask is not None:
            visible = visible & attention_mask
        # TransformerLens's operations; in place where autograd allows (softmax keeps its output)
        scores = q[:, :, start:stop] @ k  # [batch, head_index, rows, key_pos]
        scores = scale(scores).masked_fill_(~visible, ignore)
        pattern = F.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no visible key: zeros
        z[:, :, start:stop] = pattern.to(v.dtype) @ v
        yield start, pattern


def _chunked_forward(attn, layer: int, chunk: int, on_blocks: Callable[[int, Blocks], None]):
    cfg = attn.cfg

    def forward(
        query_input,
        key_input,
        value_input,
        past_kv_cache_entry=None,
        additive_attention_mask=None,
        attention_mask=None,
        position_bias=None,
        **_,
    ):
        if past_kv_cache_entry is not None or additive_attention_mask is not None:
            raise ValueError(
                "query_chunk does not support a KV cache or an additive attention mask"
            )
        q, k, v = attn.calculate_qkv_matrices(query_input, key_input, value_input)
        if cfg.positional_embedding_type == "rotary":
            q = attn.hook_rot_q(attn.apply_rotary(q, 0, attention_mask))
            k = attn.hook_rot_k(attn.apply_rotary(k, 0, attention_mask))
        repeat = q.shape[2] // k.shape[2]  # GQA: query heads per key/value head
        k = k.repeat_interleave(repeat, dim=2) if repeat > 1 else k
        v = v.repeat_interleave(repeat, dim=2) if repeat > 1 else v
        q = q.permute(0, 2, 1, 3)  # [batch, head_index, query_pos, d_head]
        k = k.permute(0, 2, 3, 1)  # [batch, head_index, d_head, key_pos]
        v = v.permute(0, 2, 1, 3)  # [batch, head_index, key_pos, d_head]
        z = torch.empty_like(v)
        blocks = _blocks(lambda scores: scores.div_(attn.attn_scale), attn.IGNORE, q, k, v, z,
                         chunk, attention_mask)  # fmt: skip
        on_blocks(layer, blocks)
        for _ in blocks:  # fill z for any block the consumer did not read
            pass
        z = attn.hook_z(z.permute(0, 2, 1, 3))  # [batch, pos, head_index, d_head]
        if not cfg.use_attn_result:
            w = einops.rearrange(
                attn.W_O, "head_index d_head d_model -> d_model (head_index d_head)"
            )
            return F.linear(z.reshape(*z.shape[:2], -1).to(w.dtype), w, attn.b_O)
        result = attn.hook_result(
            einops.einsum(
                z,
                attn.W_O,
                "batch pos head_index d_head, head_index d_head d_model "
                "-> batch pos head_index d_model",
            )
        )
        return result.sum(-2) + attn.b_O

    return forward


def _bridge_chunked_forward(
    model, layer: int, chunk: int, on_blocks: Callable[[int, Blocks], None]
):
    """The swapped forward of a ``TransformerBridge``'s attention: HF's decoder layer calls it with
    the normalised ``hidden_states`` and a 4D mask, and takes ``(attn_output, weights)`` back."""
    attn = model.blocks[layer].attn
    view = block_view(model, layer)

    def forward(*args, **kwargs):
        x = kwargs.pop("hidden_states") if "hidden_states" in kwargs else args[0]
        if kwargs.get("past_key_values") is not None or kwargs.get("past_key_value") is not None:
            raise ValueError("query_chunk does not support a KV cache")
        x = attn.hook_in(x)
        q, k, v = view.qkv(x, fire_hooks=True)  # [batch, head_index, pos, d_head]
        z = torch.empty_like(v)
        blocks = _blocks(view.scale_scores, float("-inf"), q, k.transpose(-1, -2), v, z, chunk,
                         _key_mask(kwargs.get("attention_mask")))  # fmt: skip
        on_blocks(layer, blocks)
        for _ in blocks:  # fill z for any block the consumer did not read
            pass
        z = z.transpose(1, 2).reshape(*x.shape[:2], -1)  # o.hook_in is hook_z
        return attn.hook_out(attn.o(z)), None

    return forward


def _key_mask(mask) -> Tensor | None:
    """The key positions a padded batch may attend to ``[batch, key_pos]``, from the 4D mask HF
    hands its attention (``[batch, 1, query_pos, key_pos]``, boolean or additive): its last query
    row, which sees every real key. ``None`` when there is no such mask."""
    if not isinstance(mask, Tensor) or mask.dim() != 4:
        return None
    last = mask[:, 0, -1, :]
    return last if last.dtype == torch.bool else last == 0


@contextmanager
def chunked_attention(model, query_chunk: int, on_blocks: Callable[[int, Blocks], None]):
    """Within the block, every layer's attention computes its pattern in blocks of ``query_chunk``
    query rows and calls ``on_blocks(layer, blocks)``, where ``blocks`` yields
    ``(query_start, pattern[batch, head_index, rows, key_pos])``. The original forwards are restored
    on exit, also after an error."""
    _check_model(model)
    swapped = []
    try:
        for layer, block in enumerate(model.blocks):
            if is_hooked(model):
                forward = _chunked_forward(block.attn, layer, query_chunk, on_blocks)
            else:
                forward = _bridge_chunked_forward(model, layer, query_chunk, on_blocks)
            # an instance attribute shadowing the class's forward (object's: a bridge component's
            # __setattr__ would hand it to the wrapped transformers module)
            object.__setattr__(block.attn, "forward", forward)
            swapped.append(block.attn)
        yield
    finally:
        for attn in swapped:
            object.__delattr__(attn, "forward")  # the class's forward shows through again
