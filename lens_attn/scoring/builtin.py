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
"""

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from lens_attn.scoring.protocol import Analysis, Batch, PromptRatio
from lens_attn.scoring.registry import register_analysis

SPARSITY_THRESHOLD = 0.01  # a weight below 1% of the row's mass counts as "off"

# ------------------------------------------------------------------------------- shared per-batch masks
# A pattern handed to an analysis may be a block of query rows (chunked scoring): rows are the absolute
# query positions ``batch.query_rows(n_rows)``, keys are always every position. The helpers below give
# the per-row masks of that block; whole-batch masks are built once per batch and cached in ``scratch``.


def _cached(batch: Batch, key, build):
    if key not in batch.scratch:
        batch.scratch[key] = build()
    return batch.scratch[key]


def _query_positions(batch: Batch, p: Tensor) -> Tensor:
    """``[rows]`` absolute query positions of the pattern block ``p``."""
    rows = batch.query_rows(p.shape[-2])
    return torch.arange(rows.start, rows.stop, device=p.device)


def _choice_rows(batch: Batch, p: Tensor) -> Bool[Tensor, "batch rows"]:
    """Real query rows with at least two visible keys (query_pos >= 1), for the block ``p``."""

    def build():
        rows = batch.mask.clone()
        rows[:, 0] = False
        return rows.to(p.device)

    return _cached(batch, ("choice_rows", p.device), build)[:, batch.query_rows(p.shape[-2])]


def _duplicate_mask(batch: Batch, p: Tensor) -> Bool[Tensor, "batch rows key_pos"]:
    """True where key k is an earlier copy of the query's token (k < q, both real)."""

    def build():
        t, m = batch.tokens, batch.mask
        same = t[:, :, None] == t[:, None, :]
        earlier = torch.ones(t.shape[1], t.shape[1], dtype=torch.bool, device=t.device).tril(-1)
        return (same & earlier & m[:, :, None] & m[:, None, :]).to(p.device)

    return _cached(batch, ("duplicate", p.device), build)[:, batch.query_rows(p.shape[-2])]


def _induction_mask(batch: Batch, p: Tensor) -> Bool[Tensor, "batch rows key_pos"]:
    """True where key k follows an earlier copy of the query's token (prefix matching)."""
    return torch.nn.functional.pad(_duplicate_mask(batch, p)[:, :, :-1], (1, 0))


def _rows_for(batch: Batch, p: Tensor, target_rows: Tensor) -> Float[Tensor, "batch rows"]:
    """The rows that form a prompt's denominator, as floats, under ``batch.normalize``."""
    if batch.normalize == "all_rows":
        return batch.mask.to(p.device)[:, batch.query_rows(p.shape[-2])].float()
    return (target_rows & _choice_rows(batch, p)).float()


def _ratio(mass: Float[Tensor, "batch head_index rows"], rows: Tensor) -> PromptRatio:
    """Sum ``mass`` over the counted rows; divide by their number."""
    return PromptRatio((mass * rows[:, None]).sum(-1), rows.sum(-1)[:, None])


def _at_offset(p: Tensor, batch: Batch, offset: int) -> Float[Tensor, "batch head_index rows"]:
    """``p[..., q, q - offset]`` for every row q (0 where the key would be before position 0)."""
    keys = _query_positions(batch, p) - offset
    index = keys.clamp_min(0)[None, None, :, None].expand(*p.shape[:-1], 1)
    return p.gather(-1, index)[..., 0].float() * (keys >= 0)


# --------------------------------------------------------------------------------- built-in scores


def builtin(name: str):
    """Register a built-in pattern score (chunkable: written for a block of query rows)."""
    return register_analysis(name, hooks=("pattern",), chunkable=True)


@builtin("previous_token")
def previous_token(layer, acts, batch) -> PromptRatio:
    """Attention to the previous token, ``pattern[q, q - 1]``.

    Source: TransformerLens ``head_detector.get_previous_token_head_detection_pattern``; Elhage et al.
    2021, "A Mathematical Framework for Transformer Circuits" (previous-token heads).
    """
    p = acts["pattern"]
    return _ratio(_at_offset(p, batch, 1), _rows_for(batch, p, _choice_rows(batch, p)))


@builtin("current_token")
def current_token(layer, acts, batch) -> PromptRatio:
    """Attention to the query's own position, ``pattern[q, q]`` (rows with a choice, q >= 1).

    Source: the diagonal counterpart of the previous-token score (Elhage et al. 2021).
    """
    p = acts["pattern"]
    return _ratio(_at_offset(p, batch, 0), _rows_for(batch, p, _choice_rows(batch, p)))


@builtin("duplicate_token")
def duplicate_token(layer, acts, batch) -> PromptRatio:
    """Attention to earlier copies of the current token.

    Source: TransformerLens ``get_duplicate_token_head_detection_pattern``; Wang et al. 2022,
    "Interpretability in the Wild" (duplicate-token heads in the IOI circuit).
    """
    p = acts["pattern"]
    target = _duplicate_mask(batch, p)
    mass = torch.einsum("bhqk,bqk->bhq", p.float(), target.float())
    return _ratio(mass, _rows_for(batch, p, target.any(-1)))


@builtin("induction")
def induction(layer, acts, batch) -> PromptRatio:
    """Attention to the token after an earlier copy of the current token (prefix matching).

    Source: TransformerLens ``get_induction_head_detection_pattern``; Olsson et al. 2022, "In-context
    Learning and Induction Heads" (prefix-matching score on repeated random tokens).
    """
    p = acts["pattern"]
    target = _induction_mask(batch, p)
    mass = torch.einsum("bhqk,bqk->bhq", p.float(), target.float())
    return _ratio(mass, _rows_for(batch, p, target.any(-1)))


@builtin("bos")
def bos(layer, acts, batch) -> PromptRatio:
    """Attention to position 0 (BOS), from queries q >= 1: the attention-sink score.

    Source: Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks".
    """
    p = acts["pattern"]
    return _ratio(p[..., 0].float(), _rows_for(batch, p, _choice_rows(batch, p)))


def _row_statistic(batch: Batch, p: Tensor, per_row: Tensor) -> PromptRatio:
    return _ratio(per_row, _choice_rows(batch, p).float())


@builtin("entropy")
def entropy(layer, acts, batch) -> PromptRatio:
    """Row entropy divided by ``log(number of visible keys)``: 1 for uniform, 0 for one-hot.

    Source: the normalised attention entropy of Vig & Belinkov 2019, "Analyzing the Structure of
    Attention in a Transformer Language Model"; Clark et al. 2019, "What Does BERT Look At?".
    """
    p = acts["pattern"].float()
    visible = (_query_positions(batch, p) + 1).to(p.dtype)  # keys 0..q
    h = -torch.special.xlogy(p, p).sum(-1) / torch.log(visible).clamp_min(1e-30)
    return _row_statistic(batch, p, h)


@builtin("confidence")
def confidence(layer, acts, batch) -> PromptRatio:
    """Mean of the row maximum.

    Source: Voita et al. 2019, "Analyzing Multi-Head Self-Attention" (head confidence).
    """
    p = acts["pattern"]
    return _row_statistic(batch, p, p.amax(-1).float())


@builtin("mean_distance")
def mean_distance(layer, acts, batch) -> PromptRatio:
    """Expected distance ``sum_k pattern[q, k] * (q - k)`` in tokens (small = local head).

    Source: Vig & Belinkov 2019 (mean attention distance).
    """
    p = acts["pattern"].float()
    keys = torch.arange(p.shape[-1], device=p.device, dtype=p.dtype)
    distance = (_query_positions(batch, p)[:, None] - keys[None, :]).clamp_min(0)  # [rows, key_pos]
    return _row_statistic(batch, p, torch.einsum("bhqk,qk->bhq", p, distance))


@builtin("sparsity")
def sparsity(layer, acts, batch) -> PromptRatio:
    """Share of a row's visible weights below ``SPARSITY_THRESHOLD`` (0.01).

    Source: a thresholded count in the spirit of Correia et al. 2019, "Adaptively Sparse Transformers".
    """
    p = acts["pattern"]
    queries = _query_positions(batch, p)
    visible = (
        torch.arange(p.shape[-1], device=p.device)[None, :] <= queries[:, None]
    )  # [rows, key_pos]
    below = ((p < SPARSITY_THRESHOLD) & visible).sum(-1).float()
    return _row_statistic(batch, p, below / (queries + 1))


class DominantOffset(Analysis):
    """The most common ``query_pos - argmax(key_pos)`` offset (``offset``) and how often it wins
    (``offset_share``), over rows with a choice. 1 is a previous-token head, 0 a current-token head.

    Source: the positional-offset view of heads in Clark et al. 2019, "What Does BERT Look At?".
    """

    name = "offset"
    outputs = ("offset", "offset_share")
    hooks = ("pattern",)
    chunkable = True

    def reduce(self, layer, acts, batch):
        p = acts["pattern"]
        offsets = _query_positions(batch, p)[None, None, :] - p.argmax(
            -1
        )  # [batch, head_index, rows]
        rows = _choice_rows(batch, p)[:, None, :].expand_as(offsets)
        counts = torch.zeros(p.shape[1], batch.model.cfg.n_ctx, device=p.device)
        head = torch.arange(p.shape[1], device=p.device)[None, :, None].expand_as(offsets)
        counts.index_put_(
            (head[rows], offsets[rows]), torch.ones((), device=p.device), accumulate=True
        )
        return {"offset_counts": counts}

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
            dev = w_v.device
            if dev not in ue_by_device:
                ue_by_device[dev] = model.W_U.float().to(dev) @ model.W_E.float().to(dev)
            circuit = w_o @ ue_by_device[dev] @ w_v  # [head_index, d_head, d_head]
            lam = torch.linalg.eigvals(circuit.double().cpu())
            out.append((lam.sum(-1).real / lam.abs().sum(-1).clamp_min(1e-30)).float())
        value = torch.stack(out)
        return {"copying": (value, torch.full_like(value, float("nan")))}


register_analysis(DominantOffset())
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
    "copying",
]
