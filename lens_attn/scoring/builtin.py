"""Score every head on many prompts in one streaming pass: ``score_heads`` and the built-in scores.

    >>> scores = lens_attn.score_heads(model)              # built-in probes, every built-in score
    >>> scores.to_dataframe().head()
    >>> scores.top("induction", 3)                          # [(layer, head, value), ...]

Every score is an ``Analysis`` (see ``lens_attn.analysis``) reduced inside its layer's hook; the pattern
is dropped when the hook returns, so memory holds one layer's pattern at a time, never a cache.

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

from typing import get_args

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm import tqdm

from lens_attn import chunked, distributed
from lens_attn.analysis import (
    Analysis,
    Batch,
    Normalize,
    PromptRatio,
    RatioAnalysis,
    hook_name,
    register_analysis,
    resolve,
)
from lens_attn.probes import DEFAULT_SEED, Probe, as_probes, check_context, pad, probe_hash
from lens_attn.results import HeadScores

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
        out = []
        for layer in range(model.cfg.n_layers):
            w_v, w_o = (
                model.W_V[layer].float(),
                model.W_O[layer].float(),
            )  # [head, d_model, d_head], [head, d_head, d_model]
            dev = w_v.device
            ue = model.W_U.float().to(dev) @ model.W_E.float().to(dev)  # [d_model, d_model]
            circuit = w_o @ ue @ w_v  # [head_index, d_head, d_head]
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


# ----------------------------------------------------------------------------------------- runner


def _batches(probes: list[Probe], batch_size: int):
    # sorting by length keeps padding small; results don't depend on the order (sums)
    order = sorted(range(len(probes)), key=lambda i: len(probes[i].tokens))
    for start in range(0, len(order), batch_size):
        yield [probes[i] for i in order[start : start + batch_size]]


class _Accumulator:
    """Per-analysis, per-layer summed state; kept on the device of the layer that produced it."""

    def __init__(self):
        self.state: dict[tuple[str, int], dict[str, Tensor]] = {}

    def add(self, analysis: Analysis, layer: int, update: dict[str, Tensor]) -> None:
        slot = self.state.setdefault((analysis.name, layer), {})
        for key, value in update.items():
            value = value.detach()
            slot[key] = value.clone() if key not in slot else slot[key] + value

    def all_reduce(self, group) -> None:
        """Sum every state over the ranks of ``group`` (same keys, same order on every rank)."""
        if group is None:
            return
        device = distributed.collective_device(group)
        for key in sorted(self.state):
            self.state[key] = distributed.all_reduce_sum(self.state[key], group, device=device)

    def stacked(self, analysis: Analysis, n_layers: int) -> dict[str, Tensor]:
        keys = self.state[(analysis.name, 0)].keys()
        return {
            k: torch.stack(
                [self.state[(analysis.name, layer)][k].cpu() for layer in range(n_layers)]
            )
            for k in keys
        }


def score_heads(
    model,
    prompts_or_probes: "list[str] | list[Probe] | Tensor | None" = None,
    *,
    scores: "list[str | Analysis] | None" = None,
    batch_size: int = 16,
    normalize: Normalize = "target_rows",
    query_chunk: int | None = None,
    process_group=None,
    progress: bool = True,
) -> HeadScores:
    """Score every head with every requested analysis, one forward pass per batch.

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge`` in compatibility mode.
        prompts_or_probes: prompts (tokenized like ``model.to_tokens``, so with BOS unless the model
            has ``default_prepend_bos=False``), ``Probe`` objects, a
            ``[batch, pos]`` token tensor, or ``None`` for the built-in probes (``builtin_probes``).
        scores: names of registered analyses/scores or ``Analysis`` instances; ``None`` runs every
            built-in score (``BUILTIN_SCORES``).
        batch_size: prompts per forward pass.
        normalize: ``"target_rows"`` or ``"all_rows"`` (see the module docstring).
        query_chunk: if set, never build a full ``[batch, head, T, T]`` pattern: each layer's pattern
            is recomputed from ``hook_rot_q``/``hook_rot_k`` for blocks of ``query_chunk`` query rows
            (see ``lens_attn.chunked``), so memory grows with ``query_chunk * T``, not ``T**2``.
        process_group: a ``torch.distributed`` group to shard the prompts over; ``None`` uses the
            default group if one is initialised or ``torchrun`` started this process
            (``lens_attn.distributed``). Every rank returns the same, merged result.
        progress: show a progress bar.

    Returns:
        ``HeadScores`` with a ``[layer, head_index]`` grid and standard error per score.
    """
    if normalize not in get_args(Normalize):
        raise ValueError(
            f"unknown normalize {normalize!r}; valid: {', '.join(get_args(Normalize))}"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    analyses = resolve(scores, default=BUILTIN_SCORES)
    all_probes = as_probes(model, prompts_or_probes)
    check_context(model, all_probes)
    group = distributed.current_group(process_group, device=model.cfg.device)
    probes = distributed.shard(all_probes, group)
    n_layers = model.cfg.n_layers
    hooked = [a for a in analyses if a.hooks]
    if query_chunk is not None:
        chunked.check_chunk(query_chunk, max(len(p.tokens) for p in all_probes), hooked)
    # hook name -> (layer, short name); validated up front so a typo fails before any compute
    wanted = {
        hook_name(model, hook, layer): (layer, hook)
        for a in hooked
        for hook in a.hooks
        for layer in range(n_layers)
        if not (query_chunk is not None and hook == "pattern")  # rebuilt per block instead
    }
    acc = _Accumulator()
    if hooked:
        _run_streaming(
            model, probes, hooked, wanted, acc, batch_size, normalize, query_chunk, progress
        )
    acc.all_reduce(group)

    values, stderr, counts = {}, {}, {}
    for analysis in analyses:
        if analysis.hooks:
            state = acc.stacked(analysis, n_layers)
            results = analysis.finalize(state)
        else:
            state, results = {}, analysis.from_weights(model)
        for name, (value, err) in results.items():
            values[name], stderr[name] = value.float().cpu(), err.float().cpu()
            counts[name] = state.get("count", torch.full_like(values[name], float("nan"))).float()

    import lens_attn

    provenance = {
        "model": getattr(model.cfg, "model_name", None),
        "n_layers": n_layers,
        "n_heads": model.cfg.n_heads,
        "probe_hash": probe_hash(all_probes),
        "n_prompts": len(all_probes),
        "probe_seed": DEFAULT_SEED if prompts_or_probes is None else None,
        "normalize": normalize,
        "query_chunk": query_chunk,
        "world_size": distributed.world_size(group),
        "lens_attn_version": lens_attn.__version__,
    }
    return HeadScores(values, stderr, counts, provenance)


@torch.no_grad()
def _run_streaming(
    model, probes, analyses, wanted, acc, batch_size, normalize, query_chunk, progress
):
    needs_result = any("result" in a.hooks for a in analyses)
    old_result = getattr(model.cfg, "use_attn_result", False)
    if needs_result:
        model.set_use_attn_result(True)
    try:
        batches = list(_batches(probes, batch_size))
        for chunk in tqdm(batches, desc="scoring heads", unit="batch", disable=not progress):
            tokens, mask = pad(chunk)
            batch = Batch(
                tokens.to(model.cfg.device), mask.to(model.cfg.device), chunk, model, normalize
            )
            buffer: dict[int, dict[str, Tensor]] = {}
            done: set[tuple[str, int]] = set()

            def reduce_ready(layer, batch=batch, buffer=buffer, done=done):
                acts = buffer.get(layer, {})
                for analysis in analyses:
                    ready = all(h in acts for h in analysis.hooks)
                    if (analysis.name, layer) not in done and ready:
                        acc.add(analysis, layer, analysis.reduce(layer, acts, batch))
                        done.add((analysis.name, layer))
                if all((a.name, layer) in done for a in analyses):
                    buffer.pop(layer, None)  # drop this layer's activations now

            def hook_fn(activation, hook, buffer=buffer, reduce_ready=reduce_ready):
                layer, short = wanted[hook.name]
                buffer.setdefault(layer, {})[short] = activation
                reduce_ready(layer)
                return None

            fwd_hooks = [(name, hook_fn) for name in wanted]
            if query_chunk is None:
                model.run_with_hooks(batch.tokens, fwd_hooks=fwd_hooks, return_type=None)
                continue
            pattern_analyses = [a for a in analyses if "pattern" in a.hooks]

            def on_blocks(
                layer,
                blocks,
                batch=batch,
                buffer=buffer,
                done=done,
                reduce_ready=reduce_ready,
                pattern_analyses=pattern_analyses,
            ):
                # blocks yields (query_start, pattern block); keep a running sum per analysis
                acts = buffer.setdefault(layer, {})
                totals: dict[str, object] = {}
                for start, block in blocks:
                    batch.query_start = start
                    block_acts = {**acts, "pattern": block}
                    for a in pattern_analyses:
                        part = (
                            a.ratio(layer, block_acts, batch)
                            if isinstance(a, RatioAnalysis)
                            else a.reduce(layer, block_acts, batch)
                        )
                        totals[a.name] = (
                            part if a.name not in totals else _add_parts(totals[a.name], part)
                        )
                batch.query_start = 0
                for a in pattern_analyses:
                    total = totals[a.name]
                    acc.add(a, layer, a.state(total) if isinstance(total, PromptRatio) else total)
                    done.add((a.name, layer))
                reduce_ready(layer)

            with chunked.chunked_attention(model, query_chunk, on_blocks):
                model.run_with_hooks(batch.tokens, fwd_hooks=fwd_hooks, return_type=None)
    finally:
        if needs_result:
            model.set_use_attn_result(old_result)


def _add_parts(a, b):
    """Add two blocks' results: ratios add numerators and denominators, states add key by key."""
    if isinstance(a, PromptRatio):
        return PromptRatio(a.numerator + b.numerator, a.denominator + b.denominator)
    return {k: a[k] + b[k] for k in a}
