"""One batch, one layer: the atlas's reductions of ``hook_pattern`` and ``hook_z``.

Activation (the atlas's definition): a head's activation at a query position is the norm of what it
writes into the residual stream there, ``||z W_O||``, where ``z`` is the head's ``hook_z`` row
(``[d_head]``) and ``W_O`` its ``[d_head, d_model]`` output matrix (no bias: Llama has none). It is
computed as ``sqrt(z G z^T)`` with the Gram matrix ``G = W_O W_O^T`` (``[d_head, d_head]``, once per
layer), so the ``[batch, pos, head_index, d_model]`` per-head writes are never built.

Only query positions of the text are recorded: a window's position 0 (BOS, or the text's first
token, which can attend only to itself) is left out, and so is padding.
"""

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lens_attn.atlas.accumulators import CorpusMetrics, Records, priority

EXAMPLE_FIELDS = ("doc", "query_pos", "activation", "key_pos", "key_token", "key_weight", "context")


@dataclass
class AtlasBatch:
    """A batch of windows and everything its layers share (built once per batch)."""

    tokens: Int[Tensor, "batch pos"]  # right-padded with the pad id
    valid: Bool[Tensor, "batch pos"]  # query positions to record
    doc: Int[Tensor, " batch"]
    start: Int[Tensor, " batch"]
    offset: Int[Tensor, " batch"]
    position_hash: Int[Tensor, "batch pos"]
    context: Int[Tensor, "batch padded_pos"]  # tokens with ``before`` -1s left and ``after`` right
    duplicate: Bool[Tensor, "batch query_pos key_pos"]
    induction: Bool[Tensor, "batch query_pos key_pos"]

    @classmethod
    def build(cls, tokens, real, doc, start, offset, position_hash, *, before: int, after: int):
        batch, n = tokens.shape
        pos = torch.arange(n, device=tokens.device)
        valid = real & (pos >= 1)[None]
        ids = tokens.masked_fill(~real, -1)
        context = torch.nn.functional.pad(ids, (before, after), value=-1)
        same = (ids[:, :, None] == ids[:, None, :]) & real[:, None, :] & real[:, :, None]
        earlier = pos[None, :] < pos[:, None]  # [query_pos, key_pos]: k < q
        duplicate = same & earlier & (pos[None, :] >= 1)
        # key k right after an earlier copy of the query's token: tokens[k - 1] == tokens[q], k < q
        induction = torch.zeros_like(same)
        induction[:, :, 1:] = same[:, :, :-1] & earlier[None, :, 1:] & (pos[None, None, :-1] >= 1)
        return cls(tokens, valid, doc, start, offset, position_hash, context, duplicate, induction)


@dataclass
class LayerState:
    """What the atlas keeps of one layer's heads (see ``lens_attn.atlas.accumulators``)."""

    top: Records
    sample: Records  # uniform sample of whole examples, for the decile samples and the PCA
    values: Records  # uniform sample of activation values, for the decile edges
    metrics: CorpusMetrics


@dataclass(frozen=True)
class ReduceConfig:
    k: int
    n_keys: int
    before: int
    after: int
    sample_size: int
    edge_sample: int


def reduce_pattern(
    pattern: Float[Tensor, "batch head_index query_pos key_pos"], batch: AtlasBatch, state
) -> None:
    """The corpus metrics of one layer, summed over the batch's recorded query positions."""
    valid = batch.valid[:, None, :].to(pattern.dtype)  # [batch, 1, query_pos]
    n = pattern.shape[-1]
    pos = torch.arange(n, device=pattern.device, dtype=pattern.dtype)
    metrics = state.metrics

    def add(name, per_query):  # [batch, head_index, query_pos] -> [head_index]
        metrics.add(name, (per_query * valid).sum(dim=(0, 2)))

    add("entropy", torch.special.entr(pattern).sum(-1))
    add("distance", pos - pattern @ pos)
    add("bos", pattern[..., 0])
    add("self", pattern.diagonal(dim1=-2, dim2=-1))
    add("previous", torch.nn.functional.pad(pattern.diagonal(-1, dim1=-2, dim2=-1), (1, 0)))
    for name in ("duplicate", "induction"):
        mask = getattr(batch, name)
        rows = mask.any(-1) & batch.valid  # [batch, query_pos]
        share = torch.einsum("bhqk,bqk->bhq", pattern, mask.to(pattern.dtype))
        metrics.add(name, (share * rows[:, None, :].to(share.dtype)).sum(dim=(0, 2)))
        metrics.add(f"{name}_rows", rows.sum().expand(pattern.shape[1]))


def activations(
    z: Float[Tensor, "batch pos head_index d_head"], gram: Float[Tensor, "head_index d_head d_head"]
) -> Float[Tensor, "batch pos head_index"]:
    """``||z W_O||`` per head and position, from ``gram = W_O W_O^T`` (see the module docstring)."""
    squared = (torch.einsum("bphd,hde->bphe", z, gram) * z).sum(-1)
    return squared.clamp(min=0).sqrt()


def reduce_z(
    z: Float[Tensor, "batch pos head_index d_head"],
    pattern: Float[Tensor, "batch head_index query_pos key_pos"],
    gram: Float[Tensor, "head_index d_head d_head"],
    batch: AtlasBatch,
    state: LayerState,
    layer: int,
    config: ReduceConfig,
    seed: int,
) -> None:
    """Top examples, the uniform samples and the activation sums of one layer for one batch."""
    act = activations(z, gram)  # [batch, pos, head_index]
    n_batch, n_pos, n_heads = act.shape
    valid = batch.valid
    state.metrics.add("activation", (act * valid[..., None]).sum(dim=(0, 1)))
    state.metrics.add("count", valid.sum().expand(n_heads))
    flat = act.masked_fill(~valid[..., None], -torch.inf).permute(2, 0, 1).reshape(n_heads, -1)

    def take(rank_flat, size, *, with_z=False):
        rank, index = torch.topk(rank_flat, min(size, rank_flat.shape[1]), dim=1)  # [head, n]
        return rank, _fields(index, act, pattern, z if with_z else None, batch, config)

    rank, fields = take(flat, config.k)
    state.top.offer(rank, fields)
    base = batch.position_hash
    invalid = ~valid.reshape(-1)[None, :]
    sample_rank = priority(base, layer, n_heads, salt=1).permute(2, 0, 1).reshape(n_heads, -1)
    rank, fields = take(sample_rank.masked_fill(invalid, -torch.inf), config.sample_size,
                        with_z=True)  # fmt: skip
    state.sample.offer(rank, fields)
    value_rank = priority(base, layer, n_heads, salt=2).permute(2, 0, 1).reshape(n_heads, -1)
    value_rank = value_rank.masked_fill(invalid, -torch.inf)
    rank, index = torch.topk(value_rank, min(config.edge_sample, value_rank.shape[1]), dim=1)
    state.values.offer(rank, {"activation": torch.gather(flat, 1, index)})


def _fields(index, act, pattern, z, batch: AtlasBatch, config: ReduceConfig) -> dict[str, Tensor]:
    """The record fields of the positions ``index`` (``[head_index, n]`` into ``batch * pos``)."""
    n_pos = act.shape[1]
    n_heads = act.shape[2]
    b, q = index // n_pos, index % n_pos  # [head_index, n]
    h = torch.arange(n_heads, device=index.device)[:, None].expand_as(index)
    rows = pattern[b, h, q]  # [head_index, n, key_pos]
    key_weight, key = torch.topk(rows, min(config.n_keys, rows.shape[-1]), dim=-1)
    start, offset = batch.start[b], batch.offset[b]
    key_pos = torch.where(key >= offset[..., None], start[..., None] + key - offset[..., None], -1)
    span = torch.arange(config.before + config.after + 1, device=index.device)
    fields = {
        "doc": batch.doc[b],
        "query_pos": start + q - offset,
        "activation": act[b, q, h],
        "key_pos": key_pos,
        "key_token": batch.tokens[b[..., None], key],
        "key_weight": key_weight.float(),
        "context": batch.context[b[..., None], q[..., None] + span],  # query at index ``before``
    }
    if z is not None:
        fields["z"] = z[b, q, h].float()
    return fields
