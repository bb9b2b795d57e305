"""The built-in head scores: the formulas only, each with its source.

Each is an ``Analysis`` (``lens_attn.scoring.protocol``) registered under its name when this module is
imported (``lens_attn.scoring`` imports it); ``lens_attn.scoring.runner.score_heads`` runs them.

Rows and normalisation. A pattern-based score is, per prompt, the attention mass a head puts on its
target keys, summed over query rows and divided by a number of rows; the score is the mean over prompts.

- ``normalize="all_rows"`` divides by every real query row. On one prompt this is exactly
  TransformerLens's ``detect_head(..., error_measure="mul")`` (``sum(pattern * target) / sum(pattern)``,
  and a pattern's rows sum to 1). Rows that have no target (the first token, tokens seen for the first
  time) count as zeros, so a perfect induction head scores only the share of rows that *can* induct.
- ``normalize="target_rows"`` (default) divides only by the rows that have a target and more than one
  visible key, so a perfect head scores 1.0 whatever the prompt. Prompts with no such row don't count.

Distribution statistics (``entropy``, ``confidence``, ``mean_distance``, ``sparsity``, ``offset``) use the
real rows with at least two visible keys (query_pos >= 1), where a head has a choice.

Computation. All pattern scores of a layer are computed together in ``lens_attn.scoring.fused``: a
linear score is declared here as its target and its counted rows (``@linear``), and the fused pass
contracts the pattern with every requested target at once; the row statistics are computed there in
three passes. Each score is still its own registered analysis. ``copying`` reads only the weights, as do
``copy_rank``, ``suppress_rank`` and ``successor`` (``lens_attn.scoring.ov_circuit``).
"""

import torch
from jaxtyping import Bool
from torch import Tensor

from lens_attn.scoring import fused, ioi, ov_circuit, retrieval  # noqa: F401  (they register)
from lens_attn.scoring.fused import SPARSITY_THRESHOLD  # noqa: F401  (re-exported)
from lens_attn.scoring.protocol import Analysis, Batch
from lens_attn.scoring.registry import register_analysis

# ------------------------------------------------------------------------------- shared per-batch masks
# A pattern handed to an analysis may be a block of query rows (chunked scoring): rows are the absolute
# query positions ``batch.query_rows(n_rows)``, keys are always every position. The helpers below give
# the per-row masks of that block; whole-batch masks are built once per batch and cached in ``scratch``.


def _cached(batch: Batch, key, build):
    if key not in batch.scratch:
        batch.scratch[key] = build()
    return batch.scratch[key]


def _choice_rows(batch: Batch, rows: slice, device) -> Bool[Tensor, "batch rows"]:
    """Real query rows with at least two visible keys (query_pos >= 1)."""
    return fused._choice_rows(batch, device)[:, rows]


def _duplicate_mask(batch: Batch, rows: slice, device) -> Bool[Tensor, "batch rows key_pos"]:
    """True where key k is an earlier copy of the query's token (k < q, both real)."""

    def build():
        t, m = batch.tokens, batch.mask
        same = t[:, :, None] == t[:, None, :]
        earlier = torch.ones(t.shape[1], t.shape[1], dtype=torch.bool, device=t.device).tril(-1)
        return (same & earlier & m[:, :, None] & m[:, None, :]).to(device)

    return _cached(batch, ("duplicate", device), build)[:, rows]


def _induction_mask(batch: Batch, rows: slice, device) -> Bool[Tensor, "batch rows key_pos"]:
    """True where key k follows an earlier copy of the query's token (prefix matching)."""
    return torch.nn.functional.pad(_duplicate_mask(batch, rows, device)[:, :, :-1], (1, 0))


def _rows_for(batch: Batch, rows: slice, target_rows: Tensor) -> Bool[Tensor, "batch rows"]:
    """The rows that form a prompt's denominator under ``batch.normalize``."""
    if batch.normalize == "all_rows":
        return batch.mask.to(target_rows.device)[:, rows]
    return target_rows & _choice_rows(batch, rows, target_rows.device)


# --------------------------------------------------------------------------------- built-in scores
# Linear scores are a target ``[batch or 1, rows, key_pos]`` (or ``fused.KeyAt``, one key per row,
# or ``fused.RowSums``, summed row by row)
# and the rows counted for it; the fused pass (``lens_attn.scoring.fused``) sums ``pattern * target``
# over the counted rows, every dense target in one product.


def linear(name: str):
    """Register a built-in linear pattern score given by ``fn(batch, rows, device) -> (target, rows)``:
    ``target`` a ``[batch or 1, rows, key_pos]`` mask, a ``fused.KeyAt`` or a ``fused.RowSums``."""

    def decorator(fn):
        fused.LINEAR_TARGETS[name] = fn
        register_analysis(fused.FusedScore(name, fn.__doc__))
        return fn

    return decorator


def row_statistic(name: str, doc: str) -> None:
    """Register a built-in row statistic (its formula is in ``lens_attn.scoring.fused.fused_pass``)."""
    register_analysis(fused.FusedScore(name, doc))


@linear("previous_token")
def previous_token(batch, rows, device):
    """Attention to the previous token, ``pattern[q, q - 1]``.

    Source: TransformerLens ``head_detector.get_previous_token_head_detection_pattern``; Elhage et al.
    2021, "A Mathematical Framework for Transformer Circuits" (previous-token heads).
    """
    return fused.KeyAt(offset=1), _rows_for(batch, rows, _choice_rows(batch, rows, device))


@linear("current_token")
def current_token(batch, rows, device):
    """Attention to the query's own position, ``pattern[q, q]`` (rows with a choice, q >= 1).

    Source: the diagonal counterpart of the previous-token score (Elhage et al. 2021).
    """
    return fused.KeyAt(offset=0), _rows_for(batch, rows, _choice_rows(batch, rows, device))


@linear("duplicate_token")
def duplicate_token(batch, rows, device):
    """Attention to earlier copies of the current token.

    Source: TransformerLens ``get_duplicate_token_head_detection_pattern``; Wang et al. 2022,
    "Interpretability in the Wild" (duplicate-token heads in the IOI circuit).
    """
    target = _duplicate_mask(batch, rows, device)
    return target.float(), _rows_for(batch, rows, target.any(-1))


@linear("induction")
def induction(batch, rows, device):
    """Attention to the token after an earlier copy of the current token (prefix matching).

    Source: TransformerLens ``get_induction_head_detection_pattern``; Olsson et al. 2022, "In-context
    Learning and Induction Heads" (prefix-matching score on repeated random tokens).
    """
    target = _induction_mask(batch, rows, device)
    return target.float(), _rows_for(batch, rows, target.any(-1))


@linear("bos")
def bos(batch, rows, device):
    """Attention to position 0 (BOS), from queries q >= 1: the attention-sink score.

    Source: Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks".
    """
    return fused.KeyAt(key=0), _rows_for(batch, rows, _choice_rows(batch, rows, device))


row_statistic(
    "entropy",
    """Row entropy divided by ``log(number of visible keys)``: 1 for uniform, 0 for one-hot.

    Source: the normalised attention entropy of Vig & Belinkov 2019, "Analyzing the Structure of
    Attention in a Transformer Language Model"; Clark et al. 2019, "What Does BERT Look At?".
    """,
)
row_statistic(
    "confidence",
    """Mean of the row maximum.

    Source: Voita et al. 2019, "Analyzing Multi-Head Self-Attention" (head confidence).
    """,
)


@linear("mean_distance")
def mean_distance(batch, rows, device):
    """Expected distance ``sum_k pattern[q, k] * (q - k)`` in tokens (small = local head), over rows
    with a choice.

    Source: Vig & Belinkov 2019 (mean attention distance).
    """
    queries = torch.arange(rows.start, rows.stop, device=device, dtype=torch.float32)
    keys = torch.arange(batch.tokens.shape[1], device=device, dtype=torch.float32)
    distance = (queries[:, None] - keys[None, :]).clamp_min(0)  # [rows, key_pos]
    return fused.RowSums(distance[None]), _choice_rows(batch, rows, device)


row_statistic(
    "sparsity",
    """Share of a row's visible weights below ``SPARSITY_THRESHOLD`` (0.01).

    Source: a thresholded count in the spirit of Correia et al. 2019, "Adaptively Sparse Transformers".
    """,
)


class DominantOffset(Analysis):
    """The most common ``query_pos - argmax(key_pos)`` offset (``offset``) and how often it wins
    (``offset_share``), over rows with a choice. 1 is a previous-token head, 0 a current-token head.

    Source: the positional-offset view of heads in Clark et al. 2019, "What Does BERT Look At?".
    """

    name = "offset"
    outputs = ("offset", "offset_share")
    hooks = ("pattern",)
    chunkable = True

    fused = True

    def reduce(self, layer, acts, batch):
        return fused.layer_result(self.name, layer, acts["pattern"], batch, as_state=True)

    def finalize(self, state):
        counts = state["offset_counts"]  # [layer, head_index, offset]
        best, offset = counts.max(-1)
        share = best / counts.sum(-1).clamp_min(1)
        nan = torch.full_like(share, float("nan"))
        return {"offset": (offset.float(), nan), "offset_share": (share.float(), nan.clone())}


class Copying(Analysis):
    """OV-circuit eigenvalue sign balance ``sum(λ) / sum(|λ|)`` of ``W_E W_V W_O W_U``, per head.

    +1: the head copies the tokens it attends to into the logits; -1: it suppresses them. Computed from
    the weights, not from prompts (stderr NaN). The nonzero eigenvalues of the ``[d_vocab, d_vocab]``
    circuit equal those of ``W_O (W_U W_E) W_V`` (``[d_head, d_head]``), which is what is computed.
    Under GQA each query head uses its key/value head's ``W_V`` (TransformerLens's ``W_V`` already
    repeats them per query head). Source: Elhage et al. 2021, "A Mathematical Framework for
    Transformer Circuits" (copying heads, eigenvalue analysis).
    """

    name = "copying"
    hooks = ()

    @torch.no_grad()
    def from_weights(self, model):
        # W_U W_E ([d_model, d_model], d_model^2 * d_vocab multiply-adds: the one large product)
        # once per call, and every layer's W_V / W_O stacked once (the properties stack all layers)
        w_v_all, w_o_all = model.W_V, model.W_O  # [layer, head_index, d_model, d_head], transposed
        ue_by_device: dict[torch.device, Tensor] = {}
        out = []
        for layer in range(model.cfg.n_layers):
            w_v, w_o = w_v_all[layer].float(), w_o_all[layer].float()
            if w_v.shape[0] != w_o.shape[0]:  # TransformerBridge: W_V has n_key_value_heads
                w_v = w_v.repeat_interleave(w_o.shape[0] // w_v.shape[0], dim=0)
            dev = w_v.device
            if dev not in ue_by_device:
                ue_by_device[dev] = model.W_U.float().to(dev) @ model.W_E.float().to(dev)
            circuit = w_o @ ue_by_device[dev] @ w_v  # [head_index, d_head, d_head]
            lam = torch.linalg.eigvals(circuit.double().cpu())
            out.append((lam.sum(-1).real / lam.abs().sum(-1).clamp_min(1e-30)).float())
        value = torch.stack(out)
        return {"copying": (value, torch.full_like(value, float("nan")))}


class PreviousN(Analysis):
    """Attention at a fixed offset ``k > 1``: ``previous_n`` is the largest, over ``k`` in
    ``2..MAX_OFFSET``, of the attention ``pattern[q, q - k]`` averaged over every real row
    ``q >= k`` of every prompt (rows pooled, so it adds up over blocks of query rows);
    ``previous_n_offset`` is that ``k``. No stderr (NaN): the rows are pooled, not per prompt.

    Source: positional heads at a fixed relative offset, Clark et al. 2019, "What Does BERT Look
    At?" (heads attending to the token 2 back), and the previous-n heads of Zheng et al. 2024's
    survey, "Attention Heads of Large Language Models"; ``previous_token`` is ``k = 1``.
    """

    name = "previous_n"
    outputs = ("previous_n", "previous_n_offset")
    hooks = ("pattern",)
    chunkable = True

    def reduce(self, layer, acts, batch):
        pattern = acts["pattern"].float()  # [batch, head_index, rows, key_pos] (a block of rows)
        n_batch, n_heads, n_rows, _ = pattern.shape
        keys, real = _offset_keys(batch, batch.query_rows(n_rows), pattern.device)
        # [batch, head_index, rows, offset]
        at = pattern.gather(-1, keys.expand(n_batch, n_heads, -1, -1))
        total = (at * real[:, None]).sum((0, 2))  # [head_index, offset]
        n = real.sum((0, 1))  # [offset]
        return {"sum": total, "rows": n.expand(n_heads, -1), "count": n[0].expand(n_heads)}

    def finalize(self, state):
        mean = state["sum"] / state["rows"].clamp_min(1)  # [layer, head_index, offset]
        value, index = mean.max(-1)
        nan = torch.full_like(value, float("nan"))
        return {"previous_n": (value, nan), "previous_n_offset": ((index + 2).float(), nan.clone())}


MAX_OFFSET = 8  # previous_n looks at offsets 2..8


def _offset_keys(batch: Batch, rows: slice, device) -> tuple[Tensor, Tensor]:
    """``(keys [rows, offset], real [batch, rows, offset])`` for ``previous_n``: the key
    ``q - k`` of each row and offset ``k`` in ``2..MAX_OFFSET`` (0 where it is before position
    0), and 1.0 where that row is real and the key exists. Cached per batch for the whole pattern
    (every layer reads the same), built per call for a block of rows."""

    def build():
        q = torch.arange(rows.start, rows.stop, device=device)
        k = torch.arange(2, MAX_OFFSET + 1, device=device)
        keys = q[:, None] - k[None, :]  # [rows, offset]
        real = batch.mask.to(device)[:, rows][:, :, None] & (keys >= 0)  # [batch, rows, offset]
        return keys.clamp_min(0), real.float()

    if rows.start != 0 or rows.stop != batch.tokens.shape[1]:
        return build()
    return _cached(batch, ("previous_n_keys", device), build)


register_analysis(DominantOffset())
register_analysis(PreviousN())
register_analysis(Copying())

BUILTIN_SCORES = [
    "previous_token",
    "current_token",
    "duplicate_token",
    "induction",
    "bos",
    "entropy",
    "confidence",
    "mean_distance",
    "sparsity",
    "offset",
    "previous_n",
    "copying",
    "ov_rank",  # copy_rank, suppress_rank
    "successor",
    "name_mover",  # name_mover, negative_name_mover (on ioi probes)
    "retrieval",  # on retrieval probes
]
