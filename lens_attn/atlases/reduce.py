"""One batch: the atlas's reductions of every layer's ``hook_pattern`` and ``hook_z``.

Activation (the atlas's definition): a head's activation at a query position is the norm of what it
writes into the residual stream there, ``||z W_O||``, where ``z`` is the head's ``hook_z`` row
(``[d_head]``) and ``W_O`` its ``[d_head, d_model]`` output matrix (no bias: Llama has none). It is
computed as ``sqrt(z G z^T)`` with the Gram matrix ``G = W_O W_O^T`` (``[d_head, d_head]``, once per
layer), so the ``[batch, pos, head_index, d_model]`` per-head writes are never built.

Only query positions of the text are recorded: a window's position 0 (BOS, or the text's first
token, which can attend only to itself) is left out, and so is padding.

The work is split so that little runs per layer (``BatchPass``): inside a layer's hooks only what
needs that layer's pattern or ``z`` (the pattern metrics as one ``[metric, head_index]`` row, the
activations, and the attended keys and ``z`` of the candidate positions); the rest (record merges,
histogram, sums) runs once per batch, over every layer's heads stacked on one axis,
``layer * n_heads + head_index`` ("stacked heads").
"""

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lens_attn.atlases.accumulators import CorpusMetrics, LogHistogram, Records, priority

ENTROPY_ROWS = 32
PATTERN_METRICS = ("entropy", "bos", "distance", "self", "previous", "duplicate", "induction")
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
    distance_offset: float  # sum of the recorded query positions (see ``pattern_metrics``)
    # (batch, query_pos, key_pos) of every duplicate / induction target of a recorded query, and
    # how many recorded queries have one: natural text has few, so they are gathered, not masked
    targets: dict[str, tuple[Tensor, Tensor, Tensor]]
    target_rows: dict[str, Tensor]

    @classmethod
    def build(cls, tokens, real, doc, start, offset, position_hash, *, before: int, after: int):
        n_batch, n = tokens.shape
        pos = torch.arange(n, device=tokens.device)
        valid = recorded(real)
        ids = tokens.masked_fill(~real, -1)
        context = ids.new_full((n_batch, before + n + after), -1)
        context[:, before : before + n] = ids
        # padding gets ids no token has, all different, so that it matches nothing
        distinct = ids - (~real) * (pos + 1)[None]
        previous = torch.cat([distinct.new_full((n_batch, 1), -n - 2), distinct[:, :-1]], 1)
        key = pos[None, :]
        earlier = key < pos[:, None]  # [query_pos, key_pos]: k < q
        targets, rows = {}, {}
        # duplicate: an earlier key (not position 0) holding the query's token; induction: a key
        # right after such a copy, tokens[k - 1] == tokens[q] with 1 <= k - 1 and k < q
        for name, keys, first in (("duplicate", distinct, 1), ("induction", previous, 2)):
            mask = (distinct[:, :, None] == keys[:, None, :]) & (earlier & (key >= first))
            b, q, k = mask.nonzero().unbind(1)  # a query that matches is real and not at 0
            targets[name] = (b, q, k)
            count = torch.unique_consecutive(b * n + q).numel()  # (b, q) come sorted
            rows[name] = torch.tensor(count, device=tokens.device)
        distance_offset = float((pos[None] * valid).sum())
        return cls(tokens, valid, doc, start, offset, position_hash, context, distance_offset,
                   targets, rows)  # fmt: skip


def recorded(real: Bool[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
    """The query positions the atlas records: the text's own tokens but a window's position 0."""
    return real & (torch.arange(real.shape[1], device=real.device) >= 1)[None]


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


class AtlasState:
    """What the atlas keeps of every head, on stacked heads ``layer * n_heads + head_index``."""

    def __init__(self, n_layers: int, n_heads: int, config: ReduceConfig):
        self.n_layers, self.n_heads = n_layers, n_heads
        self.top, self.sample = Records(config.k), Records(config.sample_size)
        self.histogram, self.metrics = LogHistogram(), CorpusMetrics()

    def layers(self) -> list[LayerState]:
        """One ``LayerState`` per layer (views of the stacked tensors)."""
        out, top, sample = [], self.top.sorted(), self.sample.sorted()
        for layer in range(self.n_layers):
            heads = slice(layer * self.n_heads, (layer + 1) * self.n_heads)
            histogram, metrics = LogHistogram(), CorpusMetrics()
            histogram.counts = (
                None if self.histogram.counts is None else self.histogram.counts[heads]
            )
            metrics.sums = {name: value[heads] for name, value in self.metrics.sums.items()}
            out.append(LayerState(top.heads(heads), sample.heads(heads), histogram, metrics))
        return out


def pattern_metrics(
    pattern: Float[Tensor, "batch head_index query_pos key_pos"],
    batch: AtlasBatch,
    scratch: "Scratch | None" = None,
) -> Float[Tensor, "metric head_index"]:
    """The sums over the batch's recorded query positions of ``PATTERN_METRICS``, per head.

    The entropy runs over the causal lower triangle only, in blocks of ``ENTROPY_ROWS`` query rows,
    in place on one block-sized buffer (``scratch``, reused across layers and batches), summed row
    by row. The valid rows' column sums ``[head_index, key_pos]`` give both the share on BOS
    (column 0) and the distance: ``sum_q sum_k p[q, k] (q - k) = sum_q q - sum_k colsum[k] k``
    (rows sum to 1). The shares on the previous token and on itself are diagonals; duplicate and
    induction targets are gathered.
    """
    valid = batch.valid.to(pattern.dtype)  # [batch, query_pos]
    n = pattern.shape[-1]
    tiny = torch.finfo(pattern.dtype).tiny
    scratch = scratch or Scratch()
    row_sums = pattern.new_empty(pattern.shape[:3])  # [batch, head_index, query_pos]
    for q0 in range(0, n, ENTROPY_ROWS):  # causal: rows q0..q1-1 only see keys before q1
        rows = pattern[:, :, q0 : q0 + ENTROPY_ROWS, : q0 + ENTROPY_ROWS]
        plogp = torch.clamp(rows, min=tiny, out=scratch.like(rows)).log_().mul_(rows)
        torch.sum(plogp, -1, out=row_sums[:, :, q0 : q0 + ENTROPY_ROWS])
    entropy = -torch.einsum("bhq,bq->h", row_sums, valid)
    columns = (valid[:, None, None, :] @ pattern)[:, :, 0].sum(0)  # [head_index, key_pos]
    pos = torch.arange(n, device=pattern.device, dtype=pattern.dtype)
    diagonal = torch.einsum("bhq,bq->h", pattern.diagonal(dim1=-2, dim2=-1), valid)
    previous = torch.einsum("bhq,bq->h", pattern.diagonal(-1, dim1=-2, dim2=-1), valid[:, 1:])
    gathered = [pattern[b, :, q, k].sum(0) for b, q, k in batch.targets.values()]
    return torch.stack([entropy, columns[:, 0], batch.distance_offset - columns @ pos, diagonal,
                        previous, *gathered])  # fmt: skip


class Scratch:
    """One flat buffer reused for temporaries of any shape up to the largest seen, so that a pass
    does not allocate (and page-fault) a fresh large block per layer and batch."""

    def __init__(self):
        self.buffer: Tensor | None = None

    def like(self, t: Tensor) -> Tensor:
        """A contiguous uninitialised tensor of ``t``'s shape, dtype and device (a view of the
        buffer: valid until the next call)."""
        b = self.buffer
        if b is None or b.numel() < t.numel() or b.dtype != t.dtype or b.device != t.device:
            b = self.buffer = t.new_empty(t.numel())
        return b[: t.numel()].view(t.shape)


def activations(
    z: Float[Tensor, "batch pos head_index d_head"], gram: Float[Tensor, "head_index d_head d_head"]
) -> Float[Tensor, "head_index batch_pos"]:
    """``||z W_O||`` per head and position (flattened ``batch * pos``), from ``gram = W_O W_O^T``
    (see the module docstring)."""
    n_batch, n_pos, n_heads, d_head = z.shape
    z = z.permute(2, 0, 1, 3).reshape(n_heads, n_batch * n_pos, d_head)  # [head, batch_pos, d_head]
    squared = (torch.bmm(z, gram.to(z.dtype)) * z).sum(-1)
    return squared.clamp_(min=0).sqrt_()


class BatchPass:
    """The hooks' work for one batch: ``pattern(layer, ...)`` then ``z(layer, ...)`` for every layer
    in order, then ``finish()``, which merges everything into the ``AtlasState``.

    The records change only in ``finish``, so their thresholds are read once, here. Candidates: per
    head, the positions whose activation beats the kept k-th (at most ``k``: the rest cannot enter,
    so the merge stays exact), and the positions whose sample priority reaches ``sample_floor``
    (``[stacked heads]``, from ``sample_floor``; None, where the sample will not be full when the
    buffer ends: every recorded position). Priorities hash positions, so these are known before
    the forward."""

    def __init__(self, batch: AtlasBatch, state: AtlasState, grams, config: ReduceConfig,
                 sample_floor: Tensor | None, scratch: "Scratch | None" = None):  # fmt: skip
        self.batch, self.state, self.grams, self.config = batch, state, grams, config
        self.scratch = scratch or Scratch()
        self.invalid = ~batch.valid.reshape(1, -1)  # [1, batch * pos]
        self.top_threshold = state.top.threshold()  # [stacked heads] or None
        self.rows: list[Tensor] = []  # per layer [metric, head_index]
        self.acts: list[Tensor] = []  # per layer [head_index, batch * pos]
        self.top: list[tuple] = []
        self.sample: list[tuple] = []
        rank = sample_priority(batch.valid, batch.position_hash, state)
        if sample_floor is not None:  # below it: pushed out before the buffer ends
            rank.masked_fill_(rank < sample_floor[:, None], -torch.inf)
        self.sample_rank, self.sample_index = _candidates(rank, state.sample.size, None)
        self._pattern: Tensor | None = None

    def pattern(self, layer: int, pattern: Float[Tensor, "batch head_index query_pos key_pos"]):
        self.rows.append(pattern_metrics(pattern, self.batch, self.scratch))
        self._pattern = pattern

    def z(self, layer: int, z: Float[Tensor, "batch pos head_index d_head"]):
        pattern, self._pattern = self._pattern, None
        act = activations(z, self.grams[layer])  # [head_index, batch * pos]
        self.acts.append(act)
        n_heads = act.shape[0]
        heads = slice(layer * n_heads, (layer + 1) * n_heads)
        flat = act.masked_fill(self.invalid, -torch.inf)
        threshold = None if self.top_threshold is None else self.top_threshold[heads]
        top_rank, top_index = _candidates(flat, self.state.top.size, threshold)
        sample_index = self.sample_index[heads]
        n_top = top_index.shape[1]
        key_weight, key = _attended(torch.cat([top_index, sample_index], 1), pattern,
                                    self.config.n_keys)  # fmt: skip
        self.top.append((top_rank, top_index, key[:, :n_top], key_weight[:, :n_top]))
        d_head = z.shape[-1]
        h = torch.arange(n_heads, device=z.device)[:, None]
        picked = z.reshape(-1, d_head).index_select(0, (sample_index * n_heads + h).flatten())
        self.sample.append((flat.gather(1, sample_index), key[:, n_top:], key_weight[:, n_top:],
                            picked.reshape(*sample_index.shape, d_head)))  # fmt: skip

    def finish(self) -> None:
        """Merge the batch into the state, every layer's heads at once."""
        state, batch = self.state, self.batch
        rows = torch.stack(self.rows)  # [layer, metric, head_index]
        for i, name in enumerate(PATTERN_METRICS):
            state.metrics.add(name, rows[:, i].flatten())
        acts = torch.cat(self.acts)  # [stacked heads, batch * pos]
        n_stacked = acts.shape[0]
        valid = batch.valid.to(acts.dtype)
        state.metrics.add("activation", acts @ valid.flatten())
        state.metrics.add("count", valid.sum().expand(n_stacked))
        for name, count in batch.target_rows.items():
            state.metrics.add(f"{name}_rows", count.expand(n_stacked))
        state.histogram.add(acts, batch.valid.flatten())
        width = max(part[0].shape[1] for part in self.top)
        if width:
            pad = [[_pad(t, width, fill) for t, fill in zip(part, (-torch.inf, 0, 0, 0), strict=True)]
                   for part in self.top]  # fmt: skip
            rank, index, key, key_weight = (torch.cat(t) for t in zip(*pad, strict=True))
            state.top.offer(rank, _fields(index, key, key_weight, rank, batch, self.config))
        if self.sample_index.shape[1]:
            act, key, key_weight, z = (torch.cat(t) for t in zip(*self.sample, strict=True))
            fields = _fields(self.sample_index, key, key_weight, act, batch, self.config)
            state.sample.offer(self.sample_rank, {**fields, "z": z.float()})


def sample_priority(
    valid: Bool[Tensor, "batch pos"], position_hash: Int[Tensor, "batch pos"], state: AtlasState
) -> Float[Tensor, "stacked_heads batch_pos"]:
    """Every head's sample priority of the batch's positions (``-inf`` where not recorded)."""
    rank = priority(position_hash.flatten(), state.n_layers, state.n_heads, salt=1)
    return rank.masked_fill_(~valid.reshape(1, -1), -torch.inf)


def sample_floor(positions: list[tuple[Tensor, Tensor]], state: AtlasState) -> Tensor | None:
    """Per head, the lowest priority still in the uniform sample once every batch of a buffer has
    been merged, from the batches' ``(real, position_hash)`` (``[batch, pos]`` each; shapes differ
    from batch to batch, so no jaxtyping): ``[stacked heads]``, or None while the sample would not
    be full.

    Priorities hash positions, so a whole buffer's are known before its first forward. A position
    below the floor would enter only to be pushed out by a later batch of the same buffer, so it
    is no candidate (``BatchPass``), and its attended keys and ``z`` are never gathered: per buffer
    about ``size`` candidates per head instead of ``size * (1 + ln(batches))``. The kept sample is
    the same."""
    size = state.sample.size
    running = state.sample.rank  # [stacked heads, <= size] or None
    for real, hashed in positions:
        rank = sample_priority(recorded(real), hashed, state)
        merged = rank if running is None else torch.cat([running, rank], 1)
        running = torch.topk(merged, min(size, merged.shape[1]), dim=1).values
    if running is None or running.shape[1] < size:
        return None
    return running[:, -1]


def _candidates(rank: Tensor, size: int, threshold: Tensor | None):
    """Per row of ``rank`` ``[heads, n]``, the largest entries that can enter records of ``size``
    whose lowest kept rank is ``threshold`` ``[heads]`` (None: not full): ``(rank, index)``
    ``[heads, width]``, ``width`` as small as the row that needs most allows (entries of rank
    ``-inf`` are never needed)."""
    lowest = rank.new_full((1, 1), -torch.inf) if threshold is None else threshold[:, None]
    width = min(size, int((rank > lowest).sum(1).max()))
    return torch.topk(rank, width, dim=1)


def _attended(index: Tensor, pattern: Tensor, n_keys: int) -> tuple[Tensor, Tensor]:
    """The ``n_keys`` largest attention weights and their key positions of the query rows
    ``index`` (``[head_index, n]`` into ``batch * pos``): ``[head_index, n, n_keys]`` each.

    Rows are picked with ``index_select`` on a flattened view (one index per row), much cheaper
    than multi-dimensional advanced indexing for the few hundred rows a batch offers."""
    n_batch, n_heads, n_pos, n_keys_total = pattern.shape
    b, q = index // n_pos, index % n_pos
    h = torch.arange(n_heads, device=index.device)[:, None]
    flat_rows = ((b * n_heads + h) * n_pos + q).flatten()
    rows = pattern.reshape(-1, n_keys_total).index_select(0, flat_rows)
    rows = rows.reshape(*index.shape, n_keys_total)  # [head_index, n, key_pos]
    return torch.topk(rows, min(n_keys, n_keys_total), dim=-1)


def _pad(t: Tensor, width: int, fill) -> Tensor:
    """``t`` ``[heads, n, ...]`` padded along ``n`` to ``width`` with ``fill``."""
    if t.shape[1] == width:
        return t
    extra = t.new_full((t.shape[0], width - t.shape[1], *t.shape[2:]), fill)
    return torch.cat([t, extra], 1)


def _fields(index, key, key_weight, activation, batch: AtlasBatch, config: ReduceConfig):
    """The record fields of the positions ``index`` (``[stacked heads, n]`` into ``batch * pos``),
    whose attended keys are ``key`` (positions in the window) with weights ``key_weight``."""
    n_pos = batch.tokens.shape[1]
    b, q = index // n_pos, index % n_pos
    start, offset = batch.start[b], batch.offset[b]
    key_pos = torch.where(key >= offset[..., None], start[..., None] + key - offset[..., None], -1)
    span = torch.arange(config.before + config.after + 1, device=index.device)
    width = batch.context.shape[1]
    return {
        "doc": batch.doc[b],
        "query_pos": start + q - offset,
        "activation": activation,
        "key_pos": key_pos,
        "key_token": batch.tokens.flatten()[(b * n_pos)[..., None] + key],
        "key_weight": key_weight.float(),
        "context": batch.context.flatten()[(b * width + q)[..., None] + span],  # query at before
    }
