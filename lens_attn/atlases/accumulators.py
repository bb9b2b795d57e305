"""What the atlas keeps per head while a corpus streams through: bounded by k and the head count.

Every accumulator holds heads on its first axis, ``[heads, ...]`` tensors (during the pass, every
layer's heads stacked, ``lens_attn.atlases.reduce``), and is updated once per batch:

``Records``       the ``size`` candidates with the largest ``rank`` value per head, with their fields
                  (``doc``, ``query_pos``, ``activation``, attended keys, a token context). Merging is
                  exact: ``torch.topk`` over the kept ranks and a batch's candidates picks the top
                  ``size``, so the kept set is the top of everything seen; entering candidates are
                  written into the slots of the records they push out.
                  * top examples: ``rank`` is the activation (exact top-k);
                  * the uniform sample behind the decile samples: ``rank`` is a hash priority of
                    ``(seed, layer, head, doc, query_pos)`` (:func:`priority`). Keeping the largest
                    priorities is reservoir sampling (a uniform sample without replacement) that does
                    not depend on batching, order or sharding: the same seed keeps the same positions.
``CorpusMetrics`` sums over every recorded query position (attention distance, entropy, shares),
                  turned into means at the end.

``LogHistogram``  every activation counted into log-spaced bins, per head, for the decile edges.

Decile samples (the choice the atlas makes, documented here): decile edges are estimated in the same
single pass from a histogram of *every* activation with ``BINS_PER_DECADE = 200`` log-spaced bins
over ``[1e-6, 1e4)`` (values outside fall in the end bins). Counts are exact, so an edge is exact up
to the width of its bin: within 1.2% of the true quantile's value. It costs one ``bincount`` per
layer, merges across ranks by addition and does not depend on the order of the corpus. A uniform
sample of ``10 * per_decile * 3`` whole examples is kept (``Records``, hash priorities); at the end
each example falls in the decile its activation lands in under the estimated edges, and each decile
shows its ``per_decile`` examples of highest priority (on average ``3 * per_decile`` candidates per
decile: with ``per_decile=5`` a decile comes up short with probability 0.05%, and on a tiny
corpus). No second pass over the corpus is needed.
"""

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (Thomas Mueller's), on int64 tensors holding values < 2**32: ``x``
    itself, changed in place (with one temporary: the pass hashes a ``[heads, batch * pos]`` tensor
    per batch, and fresh temporaries of that size page-fault)."""
    shifted = torch.empty_like(x)
    for _ in range(2):
        x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=shifted)).mul_(0x45D9F3B)
        x.bitwise_and_(_MASK32)
    return x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=shifted))


def position_hash(doc: Tensor, query_pos: Tensor, seed: int) -> Tensor:
    """A 32-bit hash of ``(seed, doc, query_pos)``, elementwise (int64 tensors)."""
    h = _mix32((doc & _MASK32) ^ _mix32(torch.full_like(doc, seed & _MASK32)))
    return _mix32(h ^ (query_pos & _MASK32))  # (every argument of _mix32 here is a fresh tensor)


def priority(base: Tensor, n_layers: int, n_heads: int, salt: int) -> Tensor:
    """``[layer * n_heads + head_index, n]`` priorities in ``[0, 1)`` from position hashes ``base``
    ``[n]``: every layer's heads stacked on the first axis."""
    layer = torch.arange(n_layers, device=base.device)[:, None]
    heads = (
        torch.arange(n_heads, device=base.device) + (layer * 4099 + salt * 1_000_003)
    ).flatten()
    return _mix32(base[None, :] ^ _mix32(heads & _MASK32)[:, None]).double().div_(2**32)


class Records:
    """Per head, the ``size`` records of largest ``rank`` seen so far (see the module docstring).

    Fields are ``[head_index, size, ...]`` tensors; empty slots have ``rank == -inf``. Once full,
    a merge writes the entering candidates into the slots of the records they push out, in place
    (the kept set is the same as a full sort's, without copying every kept record each batch), so
    slots are in no order: ``sorted()`` gives them largest rank first.
    """

    def __init__(self, size: int):
        self.size = size
        self.rank: Tensor | None = None  # [head_index, size]
        self.fields: dict[str, Tensor] = {}

    def threshold(self) -> Tensor | None:
        """``[head_index]``: the rank a candidate must beat to enter (None while not full)."""
        if self.rank is None or self.rank.shape[1] < self.size:
            return None
        return self.rank.amin(1)

    def offer(self, rank: Tensor, fields: dict[str, Tensor]) -> None:
        """Merge candidates: ``rank`` ``[head_index, n]``, each field ``[head_index, n, ...]``."""
        if self.threshold() is None:  # not full yet: sort everything
            if self.rank is not None:
                rank = torch.cat([self.rank, rank], dim=1)
                fields = {k: torch.cat([self.fields[k], v], dim=1) for k, v in fields.items()}
            self.rank, keep = torch.topk(rank, min(self.size, rank.shape[1]), dim=1)
            self.fields = {k: _take(v, keep) for k, v in fields.items()}
            return
        size = self.size
        _, keep = torch.topk(torch.cat([self.rank, rank], dim=1), size, dim=1, sorted=False)
        kept = torch.zeros(rank.shape[0], size + rank.shape[1], dtype=torch.bool,
                           device=rank.device).scatter_(1, keep, True)  # fmt: skip
        # per head, as many old slots freed as candidates entered: pair them in order
        head, slot = (~kept[:, :size]).nonzero().unbind(1)
        head_new, new = kept[:, size:].nonzero().unbind(1)
        self.rank[head, slot] = rank[head_new, new]
        for k, v in fields.items():
            self.fields[k][head, slot] = v[head_new, new].to(self.fields[k].dtype)

    def sorted(self) -> "Records":
        """The same records, each head's largest rank first."""
        out = Records(self.size)
        if self.rank is not None:
            out.rank, order = torch.sort(self.rank, dim=1, descending=True)
            out.fields = {k: _take(v, order) for k, v in self.fields.items()}
        return out

    def heads(self, index: slice) -> "Records":
        """The records of the heads ``index`` (views)."""
        out = Records(self.size)
        out.rank = None if self.rank is None else self.rank[index]
        out.fields = {k: v[index] for k, v in self.fields.items()}
        return out

    def to(self, device) -> "Records":
        out = Records(self.size)
        out.rank = None if self.rank is None else self.rank.to(device)
        out.fields = {k: v.to(device) for k, v in self.fields.items()}
        return out


def _take(values: Tensor, index: Tensor) -> Tensor:
    """``values[h, index[h, j], ...]`` for every head ``h``: ``[head_index, n, ...]``."""
    shape = (*index.shape, *values.shape[2:])
    expanded = index.reshape(*index.shape, *([1] * (values.ndim - 2))).expand(shape)
    return torch.gather(values, 1, expanded)


BINS_PER_DECADE = 200
LOG_RANGE = (-6, 4)  # log10 of the smallest and largest binned activation


class LogHistogram:
    """Counts of activations in log-spaced bins, ``[head_index, n_bins]`` (see the module docstring)."""

    n_bins = BINS_PER_DECADE * (LOG_RANGE[1] - LOG_RANGE[0])

    def __init__(self):
        self.counts: Tensor | None = None

    def add(self, values: Tensor, valid: Tensor) -> None:
        """``values`` ``[head_index, n]``; only entries where ``valid`` ``[n]`` is True count."""
        n_heads = values.shape[0]
        log = values[:, valid].clamp(min=10.0 ** LOG_RANGE[0]).log10()
        index = ((log - LOG_RANGE[0]) * BINS_PER_DECADE).long().clamp(0, self.n_bins - 1)
        index = index + torch.arange(n_heads, device=index.device)[:, None] * self.n_bins
        counts = torch.bincount(index.flatten(), minlength=n_heads * self.n_bins)
        counts = counts.reshape(n_heads, self.n_bins).cpu()
        self.counts = counts if self.counts is None else self.counts + counts

    def quantiles(self, qs: tuple[float, ...]) -> Tensor:
        """``[head_index, len(qs)]``: the value at the middle (in log) of each quantile's bin."""
        cumulative = self.counts.cumsum(1).double()
        total = cumulative[:, -1:].clamp(min=1)
        targets = torch.tensor(qs, dtype=torch.float64)[None] * total  # [head_index, q]
        index = torch.searchsorted(cumulative, targets).clamp(max=self.n_bins - 1)
        out = 10.0 ** ((index.double() + 0.5) / BINS_PER_DECADE + LOG_RANGE[0])
        return out.float().masked_fill(self.counts.sum(1, keepdim=True) == 0, float("nan"))


METRICS = ("distance", "entropy", "bos", "previous", "self")
"""Means over every recorded query position: attention distance ``sum_k p_k (q - k)``, entropy
``-sum_k p_k log p_k`` (nats), and the share of attention on the window's first position (BOS), on
the previous token and on the query itself."""
TARGETS = ("duplicate", "induction")
"""Means over the query positions that have such a target: the share of attention on earlier
positions holding the query's token (duplicate), or right after an earlier copy of it (induction)."""


class CorpusMetrics:
    """Sums of the per-query metrics of one layer's heads (``[head_index]`` each), and counts."""

    def __init__(self):
        self.sums: dict[str, Tensor] = {}

    def add(self, name: str, value: Tensor) -> None:
        value = value.detach().double()
        self.sums[name] = value if name not in self.sums else self.sums[name] + value

    def means(self) -> dict[str, Tensor]:
        count = self.sums["count"].clamp(min=1)
        out = {name: self.sums[name] / count for name in ("activation", *METRICS)}
        for name in TARGETS:
            out[name] = self.sums[name] / self.sums[f"{name}_rows"].clamp(min=1)
            out[name] = out[name].masked_fill(self.sums[f"{name}_rows"] == 0, float("nan"))
        return out
