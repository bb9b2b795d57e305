"""Every built-in pattern score of a layer in four passes over its pattern, instead of one or more
passes per score.

- The *linear* scores (``previous_token``, ``current_token``, ``duplicate_token``, ``induction``,
  ``bos``, ``mean_distance``) are each ``sum_{q,k} pattern[b, h, q, k] * weight_s[b, q, k]``, where
  ``weight_s`` is the score's target times its counted rows (``lens_attn.scoring.builtin``). The
  dense weights are stacked into one ``[batch, score, query_pos * key_pos]`` tensor, built once per
  batch, and contracted with the pattern in one batched matrix product; a target with one key per
  row (``KeyAt``: ``previous_token``, ``current_token``, ``bos``) is read off the pattern directly;
  one with large weights (``RowSums``: ``mean_distance``) is summed over keys row by row.
- The row statistics: one ``max`` over keys gives ``confidence`` (the values) and ``offset`` (the
  indices); one ``xlogy`` sum gives ``entropy``; one comparison gives ``sparsity``. They read only
  the keys at or before each block of rows' last query.

On a small model most of the cost is a fixed cost per operation, so each step is a few large tensor
operations per layer, not many small ones.

How it plugs into the protocol: each fused built-in is an ordinary ``RatioAnalysis`` (a
``FusedScore``), registered under its own name. ``score_heads`` lists the fused scores it runs in
``Batch.fused``; the first of them called for a layer (or a block of query rows) computes all of them
and leaves the others' results in ``Batch.scratch``, where they pick them up. Called on its own (no
``Batch.fused``), a fused score computes just itself. Results equal the one-score-at-a-time formulas
up to float32 summation order (``tests/test_score_references.py``).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from lens_attn.scoring.protocol import Batch, PromptRatio, RatioAnalysis

SPARSITY_THRESHOLD = 0.01  # a weight below 1% of the row's mass counts as "off"

# name -> fn(batch, rows: slice, device) -> (target [batch or 1, rows, key_pos], counted rows
# [batch, rows]); filled by ``lens_attn.scoring.builtin``, in the order the scores are registered
LINEAR_TARGETS: dict[str, Callable] = {}
ROW_STATISTICS = ("entropy", "confidence", "sparsity")
OFFSET = "offset"
# each row statistic's reduction over keys in ``_row_reductions``
_ROW_PARTS = {"confidence": "top", OFFSET: "argtop", "entropy": "plogp", "sparsity": "above"}


class FusedScore(RatioAnalysis):
    """A built-in pattern score computed in the fused pass; ``doc`` is its formula and source."""

    fused = True

    def __init__(self, name: str, doc: str | None):
        super().__init__(name, self._from_pass, ("pattern",), chunkable=True)
        self.__doc__ = doc

    def _from_pass(self, layer, acts, batch) -> PromptRatio:
        return layer_result(self.name, layer, acts["pattern"], batch)

    def reduce(self, layer, acts, batch):
        return layer_result(self.name, layer, acts["pattern"], batch, as_state=True)


def layer_result(name: str, layer: int, pattern: Tensor, batch: Batch, *, as_state: bool = False):
    """``name``'s result for this layer's pattern (block), running the fused pass on first use:
    a ``PromptRatio`` (or, ``as_state``, its summable state, computed for every ratio at once)."""
    key = ("fused", layer, batch.query_start, as_state)
    results = batch.scratch.get(key)
    if results is None or name not in results:
        names = batch.fused if name in batch.fused else (name,)
        results = _over_mass_left(fused_pass(names, pattern, batch), pattern, batch)
        results = batch.scratch[key] = _states(results) if as_state else results
    out = results.pop(name)
    if not results:
        del batch.scratch[key]
    return out


def _over_mass_left(results: dict, pattern: Tensor, batch: Batch) -> dict:
    """Under ``normalize="all_rows"`` with ``exclude_bos``/``exclude_current_token``, the linear
    scores divide by the attention mass left instead of the row count (``Batch.mass_left``), as
    ``detect_head``'s "mul" does; otherwise ``results`` unchanged."""
    left = batch.mass_left(pattern) if batch.normalize == "all_rows" else None
    if left is None:
        return results
    return {
        name: PromptRatio(r.numerator, left) if name in LINEAR_TARGETS else r
        for name, r in results.items()
    }


def _states(results: dict) -> dict:
    """Every ``PromptRatio`` in ``results`` turned into its state in one go (``RatioAnalysis.state``
    on the stacked ratios: the same elementwise operations, so the same numbers)."""
    ratios = [name for name, r in results.items() if isinstance(r, PromptRatio)]
    if not ratios:
        return results
    num = torch.stack([results[n].numerator for n in ratios], -1)  # [batch, head_index, score]
    den = torch.stack([results[n].denominator.expand_as(results[n].numerator) for n in ratios], -1)
    flat = PromptRatio(num.flatten(1), den.flatten(1))  # [batch, head_index * score]
    state = RatioAnalysis.state(None, flat)  # ``state`` does not read ``self``
    out = dict(results)
    for i, name in enumerate(ratios):
        out[name] = {k: v.view(num.shape[1], -1)[:, i] for k, v in state.items()}
    return out


def _choice_rows(batch: Batch, device) -> Tensor:
    """``[batch, pos]`` real query rows with at least two visible keys (query_pos >= 1)."""
    key = ("choice_rows", device)
    if key not in batch.scratch:
        rows = batch.mask.clone()
        rows[:, 0] = False
        batch.scratch[key] = rows.to(device)
    return batch.scratch[key]


@dataclass(frozen=True)
class KeyAt:
    """A linear target with one key per query row: ``key_pos == query_pos - offset`` (none where
    that is before position 0), or ``key_pos == key`` on every row when ``key`` is set. The fused
    pass reads such a target's entries straight off the pattern instead of contracting a mostly-zero
    ``[rows, key_pos]`` mask with it."""

    offset: int = 0
    key: int | None = None

    def values(
        self, pattern: Float[Tensor, "batch head_index rows key_pos"], rows: slice
    ) -> Float[Tensor, "batch head_index rows"]:
        """``pattern[..., q, key(q)]`` for the rows ``rows`` of a block, 0 where there is no key."""
        if self.key is not None:
            return pattern[..., self.key]
        shift = rows.start - self.offset  # the key of the block's first row
        # row j of the block holds (j, j + shift); rows with a key before 0 are missing at the front
        diagonal = pattern.diagonal(shift, dim1=-2, dim2=-1)
        return torch.nn.functional.pad(diagonal, (max(0, -shift), 0))


@dataclass(frozen=True)
class RowSums:
    """A linear target with large weights (``mean_distance``'s distances, up to ``T``), summed
    over the keys of each row before the rows are added. One flat ``rows * key_pos`` contraction
    in float32 is off by up to ~1e-6 relative at T=1024 (and by a different amount for each block
    of rows under ``query_chunk``); row by row it is ~4e-8 (``experiments/backends.md``)."""

    weights: Float[Tensor, "batch_or_1 rows key_pos"]

    def values(
        self, pattern: Float[Tensor, "batch head_index rows key_pos"], rows: slice
    ) -> Float[Tensor, "batch head_index rows"]:
        return (pattern * self.weights[:, None]).sum(-1)


def _linear_weights(batch: Batch, names: tuple[str, ...], n_rows: int, device):
    """For a block: ``(weights [batch, dense score, rows * key_pos] or None, counted rows [batch,
    score], {score index: (KeyAt or RowSums, [batch, rows] counted rows)})``; the whole pattern's are cached
    for the batch (a block's are built per call: caching every block would hold the ``T x T``
    weights that chunked scoring avoids). The dense weights are score-major, so that the product
    with the pattern reads each score's weights contiguously (about 2x faster on the CPU)."""
    rows = batch.query_rows(n_rows)
    key = ("fused_weights", names, device)
    whole = rows.start == 0 and n_rows == batch.tokens.shape[1]
    if whole and key in batch.scratch:
        return batch.scratch[key]
    weights, counted, one_key = [], [], {}
    for i, name in enumerate(names):
        target, target_rows = LINEAR_TARGETS[name](batch, rows, device)
        target_rows = target_rows.float()  # [batch, rows]
        counted.append(target_rows.sum(-1))
        if isinstance(target, (KeyAt, RowSums)):
            one_key[i] = (target, target_rows)
        else:
            weights.append(target * target_rows[:, :, None])  # [batch, rows, key_pos]
    dense = torch.stack(weights, 1).flatten(2) if weights else None  # [batch, score, rows * keys]
    out = (dense, torch.stack(counted, -1), one_key)
    if whole:
        batch.scratch[key] = out
    return out


def _linear_numerators(
    pattern: Float[Tensor, "batch head_index rows key_pos"], weights, one_key: dict, rows: slice
) -> list[Float[Tensor, "batch head_index"]]:
    """``sum_{q,k} pattern * weight_s`` for every linear score ``s``, in the order of
    ``_linear_weights``: the dense ones from one batched product, the one-key and ``RowSums``
    ones row by row, then over their rows."""
    dense = []
    if weights is not None:
        flat = pattern.reshape(*pattern.shape[:2], -1)  # [batch, head_index, rows * key_pos]
        dense = list(torch.bmm(flat, weights.transpose(1, 2)).unbind(-1))
    columns = []
    for i in range(len(one_key) + len(dense)):
        if i in one_key:
            target, target_rows = one_key[i]
            columns.append((target.values(pattern, rows) * target_rows[:, None]).sum(-1))
        else:
            columns.append(dense.pop(0))
    return columns


def _ratio(per_row: Float[Tensor, "batch head_index rows"], rows: Tensor) -> PromptRatio:
    return PromptRatio((per_row * rows[:, None]).sum(-1), rows.sum(-1)[:, None])


@torch.no_grad()
def fused_pass(names, pattern: Tensor, batch: Batch) -> dict:
    """Every fused score in ``names`` for one pattern (block) ``[batch, head_index, rows, key_pos]``:
    ``{name: PromptRatio}``, and for ``offset`` ``{"offset": {"offset_counts": [head_index, n_ctx]}}``."""
    p = pattern.float()
    n_rows = p.shape[2]
    out: dict = {}
    linear = tuple(n for n in LINEAR_TARGETS if n in names)
    if linear:
        weights, counted, one_key = _linear_weights(batch, linear, n_rows, p.device)
        num = _linear_numerators(p, weights, one_key, batch.query_rows(n_rows))
        for i, name in enumerate(linear):
            out[name] = PromptRatio(num[i], counted[:, i : i + 1])
    rows_slice = batch.query_rows(n_rows)
    choice = _choice_rows(batch, p.device)[:, rows_slice]  # [batch, rows]
    queries = torch.arange(rows_slice.start, rows_slice.stop, device=p.device)
    stats = [n for n in (*ROW_STATISTICS, OFFSET) if n in names]
    if stats:
        per_row = _row_statistics(stats, pattern, queries, first_query=rows_slice.start)
        for name in stats:
            if name == OFFSET:
                out[OFFSET] = _offset_counts(
                    batch, queries[None, None, :] - per_row[OFFSET], choice
                )
            else:
                out[name] = _ratio(per_row[name], choice.float())
    return out


def _row_statistics(
    stats, pattern: Tensor, queries: Tensor, *, first_query: int
) -> dict[str, Tensor]:
    """``{name: [batch, head_index, rows]}`` for the row statistics in ``stats``. Rows go in blocks,
    each reading only the keys up to its last query (the keys after it carry exactly 0 under the
    causal mask), which skips about half of the pattern. ``queries`` are the absolute positions
    ``first_query, first_query + 1, ...`` of the rows; the block bounds come from ``first_query``, a
    Python int, so no value is read back from the device. Only the reductions over keys run per
    block; the per-row arithmetic runs once on the joined rows (each op has a fixed cost, which on a
    small model is most of the time)."""
    n_rows = pattern.shape[-2]
    # at most 8 blocks of at least 16 rows
    parts = _row_reductions(stats, pattern, first_query, size=max(16, -(-n_rows // 8)))
    joined = {name: torch.cat(blocks, -1) for name, blocks in parts.items()}  # [batch, head, rows]
    out = {}
    if "confidence" in stats:
        out["confidence"] = joined["top"].float()
    if OFFSET in stats:
        out[OFFSET] = joined["argtop"]
    if "entropy" in stats:
        visible = (queries + 1).to(joined["plogp"].dtype)  # keys 0..q
        out["entropy"] = -joined["plogp"] / torch.log(visible).clamp_min(1e-30)
    if "sparsity" in stats:
        # keys after q carry exactly 0 (< the threshold): count the visible ones at or above it
        below = (queries + 1) - joined["above"]  # whole numbers, exact in float32
        out["sparsity"] = below / (queries + 1)
    return out


def _row_reductions(stats, pattern: Tensor, first_query: int, *, size: int) -> dict[str, list]:
    """The reductions over keys behind ``_row_statistics``, per block of ``size`` rows:
    ``{"top"/"argtop": row max and its first key, "plogp": sum p log p, "above": count of weights
    >= SPARSITY_THRESHOLD (float)}``, each a list of ``[batch, head_index, block rows]``."""
    n_rows = pattern.shape[-2]
    parts: dict[str, list] = {_ROW_PARTS[name]: [] for name in stats}
    for start in range(0, n_rows, size):
        stop = min(n_rows, start + size)
        p = pattern[:, :, start:stop, : first_query + stop]  # keys 0..last query
        if "top" in parts or "argtop" in parts:
            top, argtop = p.max(-1)  # one pass: the row maximum and its first key
            parts.get("top", []).append(top)
            parts.get("argtop", []).append(argtop)
        if "plogp" in parts:
            pf = p.float()
            # xlogy(p, p) in place (3x faster than xlogy on the CPU); a weight of 0 gives 0 * log(tiny)
            plogp = pf.clamp_min(torch.finfo(pf.dtype).tiny).log_().mul_(pf)
            parts["plogp"].append(plogp.sum(-1))
        if "above" in parts:
            # compared into a float tensor: about 4x faster on the CPU than a bool result; the
            # sum of 0s and 1s is exact (rows are far shorter than 2**24)
            above = torch.ge(p, SPARSITY_THRESHOLD, out=torch.empty(p.shape, device=p.device))
            parts["above"].append(above.sum(-1))
    return parts


def _offset_counts(batch: Batch, offsets: Tensor, choice: Tensor) -> dict[str, Tensor]:
    """``offsets`` ``[batch, head_index, rows]`` counted per head over the rows with a choice."""
    n_heads = offsets.shape[1]
    counts = torch.zeros(n_heads, batch.model.cfg.n_ctx, device=offsets.device)
    weight = choice[:, None, :].expand_as(offsets).float().transpose(0, 1).reshape(n_heads, -1)
    index = offsets.clamp_min(0).transpose(0, 1).reshape(n_heads, -1)  # padded rows: weight 0
    counts.scatter_add_(1, index, weight)
    return {"offset_counts": counts}
