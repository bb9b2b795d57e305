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

from lens_attn.atlases.accumulators import CorpusMetrics, LogHistogram, Records, priority

ENTROPY_ROWS = 32
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
    distance_offset: float  # sum of the recorded query positions (see ``reduce_pattern``)
    # (batch, query_pos, key_pos) of every duplicate / induction target of a recorded query, and
    # how many recorded queries have one: natural text has few, so they are gathered, not masked
    targets: dict[str, tuple[Tensor, Tensor, Tensor]]
    target_rows: dict[str, Tensor]

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
        targets, rows = {}, {}
        for name, mask in (("duplicate", duplicate), ("induction", induction)):
            mask = mask & valid[:, :, None]
            targets[name] = tuple(mask.nonzero().unbind(1))
            rows[name] = mask.any(-1).sum()
        distance_offset = float((pos[None] * valid).sum())
        return cls(tokens, valid, doc, start, offset, position_hash, context, distance_offset,
                   targets, rows)  # fmt: skip


@dataclass
class LayerState:
    """What the atlas keeps of one layer's heads (see ``lens_attn.atlases.accumulators``)."""

    top: Records
    sample: Records  # uniform sample of whole examples, for the decile samples and the PCA
    histogram: LogHistogram  # every activation, for the decile edges
    metrics: CorpusMetrics


@dataclass(frozen=True)
class ReduceConfig:
    k: int
    n_keys: int
    before: int
    after: int
    sample_size: int


def reduce_pattern(
    pattern: Float[Tensor, "batch head_index query_pos key_pos"], batch: AtlasBatch, state
) -> None:
    """The corpus metrics of one layer, summed over the batch's recorded query positions.

    Two passes over the pattern: the entropy (over the causal lower triangle only, in blocks of
    ``ENTROPY_ROWS`` query rows), and the valid rows' column sums ``[head_index,
    key_pos]``, from which both the share on BOS (column 0) and the distance come:
    ``sum_q sum_k p[q, k] (q - k) = sum_q q - sum_k colsum[k] k`` (rows sum to 1). The shares on the
    previous token and on itself are diagonals; duplicate and induction targets are gathered.
    """
    valid = batch.valid.to(pattern.dtype)  # [batch, query_pos]
    n = pattern.shape[-1]
    pos = torch.arange(n, device=pattern.device, dtype=pattern.dtype)
    metrics = state.metrics

    def add(name, per_query):  # [batch, head_index, query_pos] -> [head_index]
        metrics.add(name, torch.einsum("bhq,bq->h", per_query, valid))

    entropy = torch.zeros(pattern.shape[1], dtype=torch.float64, device=pattern.device)
    for q0 in range(0, n, ENTROPY_ROWS):  # causal: rows q0..q1-1 only see keys before q1
        rows = pattern[:, :, q0 : q0 + ENTROPY_ROWS, : q0 + ENTROPY_ROWS]
        plogp = (rows * rows.clamp(min=1e-30).log()).sum(-1)  # [batch, head_index, rows]
        entropy -= torch.einsum("bhq,bq->h", plogp, valid[:, q0 : q0 + ENTROPY_ROWS]).double()
    metrics.add("entropy", entropy)
    columns = (valid[:, None, None, :] @ pattern)[:, :, 0].sum(0)  # [head_index, key_pos]
    metrics.add("bos", columns[:, 0])
    metrics.add("distance", batch.distance_offset - columns @ pos)
    add("self", pattern.diagonal(dim1=-2, dim2=-1))
    add("previous", torch.nn.functional.pad(pattern.diagonal(-1, dim1=-2, dim2=-1), (1, 0)))
    for name, (b, q, k) in batch.targets.items():
        metrics.add(name, pattern[b, :, q, k].sum(0))  # [targets, head_index] -> [head_index]
        metrics.add(f"{name}_rows", batch.target_rows[name].expand(pattern.shape[1]))


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

    def offer(records: Records, rank_flat, *, with_z=False):
        # only candidates that beat the kept ones' lowest rank can enter: the rest are skipped
        # before any gathering (the result is the same)
        threshold = records.threshold()
        size = records.size
        if threshold is not None:
            size = min(size, int((rank_flat > threshold[:, None]).sum(1).max()))
            if size == 0:
                return
        rank, index = torch.topk(rank_flat, min(size, rank_flat.shape[1]), dim=1)  # [head, n]
        records.offer(rank, _fields(index, act, pattern, z if with_z else None, batch, config))

    offer(state.top, flat)
    invalid = ~valid.reshape(-1)[None, :]
    sample_rank = priority(batch.position_hash, layer, n_heads, salt=1)
    sample_rank = sample_rank.permute(2, 0, 1).reshape(n_heads, -1).masked_fill(invalid, -torch.inf)
    offer(state.sample, sample_rank, with_z=True)
    state.histogram.add(flat, valid.reshape(-1))


def _fields(index, act, pattern, z, batch: AtlasBatch, config: ReduceConfig) -> dict[str, Tensor]:
    """The record fields of the positions ``index`` (``[head_index, n]`` into ``batch * pos``).

    Rows are picked with ``index_select`` on flattened views (one index per row), which is much
    cheaper than multi-dimensional advanced indexing for the few hundred rows a batch offers."""
    n_batch, n_pos, n_heads = act.shape
    b, q = index // n_pos, index % n_pos  # [head_index, n]
    h = torch.arange(n_heads, device=index.device)[:, None]
    n_keys = pattern.shape[-1]
    rows = pattern.reshape(-1, n_keys).index_select(0, ((b * n_heads + h) * n_pos + q).flatten())
    rows = rows.reshape(*index.shape, n_keys)  # [head_index, n, key_pos]
    key_weight, key = torch.topk(rows, min(config.n_keys, n_keys), dim=-1)
    start, offset = batch.start[b], batch.offset[b]
    key_pos = torch.where(key >= offset[..., None], start[..., None] + key - offset[..., None], -1)
    span = torch.arange(config.before + config.after + 1, device=index.device)
    width = batch.context.shape[1]
    context = batch.context.flatten()[(b * width + q)[..., None] + span]  # query at ``before``
    fields = {
        "doc": batch.doc[b],
        "query_pos": start + q - offset,
        "activation": act.flatten()[(index * n_heads + h)],
        "key_pos": key_pos,
        "key_token": batch.tokens.flatten()[(b * n_pos)[..., None] + key],
        "key_weight": key_weight.float(),
        "context": context,
    }
    if z is not None:
        d_head = z.shape[-1]
        picked = z.reshape(-1, d_head).index_select(0, (index * n_heads + h).flatten())
        fields["z"] = picked.reshape(*index.shape, d_head).float()
    return fields
