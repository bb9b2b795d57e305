"""Score every head on many prompts in one streaming pass: ``score_heads``.

    >>> scores = lens_attn.score_heads(model, progress=False)  # built-in probes, every score
    >>> scores["induction"].shape                               # [layer, head_index]
    torch.Size([4, 8])
    >>> [(layer, head) for layer, head, value in scores.top("induction", 3)]  # doctest: +ELLIPSIS
    [(1, ...), (1, ...), (1, ...)]

Every score is an ``Analysis`` (``lens_attn.scoring.protocol``) reduced inside its layer's hook; the
pattern is dropped when the hook returns, so memory holds one layer's pattern at a time, never a
cache. The built-in formulas, and how rows are normalised, are in ``lens_attn.scoring.builtin``.
"""

import inspect
from typing import get_args

import torch
from torch import Tensor

from lens_attn import compat, distributed
from lens_attn.probes import DEFAULT_SEED, Probe, as_probes, check_context, pad, probe_hash
from lens_attn.progress import progress_bar
from lens_attn.scoring import chunked
from lens_attn.scoring.builtin import BUILTIN_SCORES
from lens_attn.scoring.protocol import (
    Analysis,
    Batch,
    Normalize,
    PromptRatio,
    RatioAnalysis,
    hook_name,
)
from lens_attn.scoring.registry import registered, resolve
from lens_attn.scoring.results import HeadScores


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
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
    heads=None,
    cache=None,
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
            built-in score (``BUILTIN_SCORES``; with ``query_chunk``, those that can run on
            blocks of query rows: not ``name_mover``, which also reads ``hook_z``, nor ``retrieval``).
        batch_size: prompts per forward pass.
        normalize: ``"target_rows"`` or ``"all_rows"`` (see the module docstring).
        query_chunk: if set, never build a full ``[batch, head, T, T]`` pattern: each layer's pattern
            is recomputed from ``hook_rot_q``/``hook_rot_k`` for blocks of ``query_chunk`` query rows
            (see ``lens_attn.scoring.chunked``), so memory grows with ``query_chunk * T``, not ``T**2``.
        exclude_bos, exclude_current_token: TransformerLens ``detect_head``'s flags: every score
            that reads the pattern sees attention to ``key_pos`` 0 (BOS), and/or each query's
            attention to its own position, as 0 ("mul" ratios then share out what is left); a
            ``DetectionPattern`` with ``measure="abs"`` leaves those entries out of its error.
        heads: score only these heads, as ``detect_head``'s ``heads``: ``[(layer, head), ...]``,
            ``"L1H3"``/``"L1"`` specs, or ``{layer: [head, ...]}``. The other heads' entries are
            NaN (``detect_head`` gives them -1); ``top`` never lists them and ``classify`` labels
            them with nothing.
        cache: an ``ActivationCache`` (or dict) from ``model.run_with_cache`` on exactly these
            prompts, in this order: ``[batch, ...]`` activations, or one prompt's without the batch
            axis (``remove_batch_dim=True``). The scores are computed from it without running the
            model; it must hold every hook the analyses read (``blocks.<layer>.attn.hook_pattern``
            for the pattern scores). Not with ``query_chunk``; not sharded over processes.
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
    analyses = resolve(scores, default=default_scores(query_chunk))
    all_probes = as_probes(model, prompts_or_probes)
    check_context(model, all_probes)
    if cache is not None and query_chunk is not None:
        raise ValueError("cache= and query_chunk= exclude each other: a cache holds full patterns")
    # a cache holds every prompt's activations: scored here, in one process
    group = (
        None
        if cache is not None
        else distributed.current_group(process_group, device=model.cfg.device)
    )
    probes = distributed.shard(all_probes, group)
    chosen = _chosen_heads(model, heads)
    n_layers = model.cfg.n_layers
    hooked = [a for a in analyses if a.hooks]
    if query_chunk is not None:
        chunked.check_chunk(query_chunk, max(len(p.tokens) for p in all_probes), hooked)
    # hook name -> (layer, short name); validated up front so a typo fails before any compute
    hook_dict = model.hook_dict
    wanted = {
        hook_name(model, hook, layer, hook_dict=hook_dict): (layer, hook)
        for a in hooked
        for hook in a.hooks
        for layer in range(n_layers)
        if not (query_chunk is not None and hook == "pattern")  # rebuilt per block instead
    }
    acc = _Accumulator()
    if hooked and cache is not None:
        _run_from_cache(model, probes, hooked, wanted, acc, normalize, cache,
                        (exclude_bos, exclude_current_token))  # fmt: skip
    elif hooked:
        _run_streaming(
            model, probes, hooked, wanted, acc, batch_size, normalize, query_chunk, progress,
            (exclude_bos, exclude_current_token),
        )  # fmt: skip
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
    if chosen is not None:  # the heads not asked for: NaN
        for table in (values, stderr, counts):
            for name in table:
                table[name] = table[name].masked_fill(~chosen, float("nan"))

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
        "exclude_bos": exclude_bos,
        "exclude_current_token": exclude_current_token,
        "heads": None if chosen is None else chosen.nonzero().tolist(),
        "from_cache": cache is not None,
        "world_size": distributed.world_size(group),
        "lens_attn_version": lens_attn.__version__,
    }
    return HeadScores(values, stderr, counts, provenance)


def default_scores(query_chunk: int | None = None) -> list[str]:
    """``BUILTIN_SCORES``; with ``query_chunk``, those that run on blocks of query rows (weight
    scores, and pattern scores declared ``chunkable``)."""
    if query_chunk is None:
        return list(BUILTIN_SCORES)
    table = registered()
    return [n for n in BUILTIN_SCORES
            if not table[n].hooks or (table[n].chunkable and table[n].hooks == ("pattern",))]  # fmt: skip


def _chosen_heads(model, heads) -> "Tensor | None":
    """``[layer, head_index]`` True on the heads ``heads`` names (None: every head)."""
    if heads is None:
        return None
    from lens_attn.heads import resolve_heads

    if isinstance(heads, dict):  # detect_head's {layer: [head, ...]}
        heads = [(layer, head) for layer, layer_heads in heads.items() for head in layer_heads]
    chosen = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, dtype=torch.bool)
    for layer, head in resolve_heads(model, heads):
        chosen[layer, head] = True
    return chosen


@torch.no_grad()
def _run_from_cache(model, probes, analyses, wanted, acc, normalize, cache, exclude) -> None:
    """Every analysis on the cached activations of ``probes`` (one batch, in their order)."""
    tokens, mask = pad(probes)
    device = model.cfg.device
    batch = Batch(tokens.to(device), mask.to(device), probes, model, normalize,
                  exclude_bos=exclude[0], exclude_current_token=exclude[1])  # fmt: skip
    acts: dict[int, dict[str, Tensor]] = {}
    missing = [name for name in wanted if name not in cache]
    if missing:
        raise ValueError(
            f"the cache has no {missing[:3]}{' ...' if len(missing) > 3 else ''}: run_with_cache "
            "must keep every hook the requested scores read"
        )
    for name, (layer, short) in wanted.items():
        act = cache[name]
        batched_ndim = 4 if short in ("pattern", "attn_scores", "z", "q", "k", "v", "result") else 3
        if act.ndim == batched_ndim - 1:  # remove_batch_dim=True: one prompt
            act = act[None]
        expected_pos = tokens.shape[1]
        if (
            act.shape[0] != len(probes)
            or act.shape[-1 if short == "pattern" else 1] != expected_pos
        ):
            raise ValueError(
                f"cache[{name!r}] has shape {tuple(act.shape)}, which is not a run on these "
                f"{len(probes)} prompts of {expected_pos} positions (right-padded, in order)"
            )
        if short == "pattern":
            act = batch.scored_pattern(act)
        acts.setdefault(layer, {})[short] = act
    for layer, layer_acts in acts.items():
        for analysis in analyses:
            acc.add(analysis, layer, analysis.reduce(layer, layer_acts, batch))


@torch.no_grad()
def _run_streaming(
    model, probes, analyses, wanted, acc, batch_size, normalize, query_chunk, progress, exclude
):
    needs_result = any("result" in a.hooks for a in analyses)
    old_result = getattr(model.cfg, "use_attn_result", False)
    if needs_result:
        model.set_use_attn_result(True)
    try:
        batches = list(_batches(probes, batch_size))
        stop = _stop_kwargs(model, wanted, analyses, query_chunk)
        fused_names = tuple(a.name for a in analyses if getattr(a, "fused", False))
        n_reductions = len(analyses) * model.cfg.n_layers  # every analysis reads every layer
        for chunk in progress_bar(batches, desc="scoring heads", unit="batch", enabled=progress):
            tokens, mask = pad(chunk)
            batch = Batch(
                tokens.to(model.cfg.device), mask.to(model.cfg.device), chunk, model, normalize,
                fused=fused_names, exclude_bos=exclude[0], exclude_current_token=exclude[1],
            )  # fmt: skip
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
                if len(done) == n_reductions:
                    raise compat.StopForward  # nothing after this hook is read: skip the rest

            def hook_fn(activation, hook, batch=batch, buffer=buffer, reduce_ready=reduce_ready):
                layer, short = wanted[hook.name]
                if short == "pattern":
                    activation = batch.scored_pattern(activation)
                buffer.setdefault(layer, {})[short] = activation
                reduce_ready(layer)
                return None

            fwd_hooks = [(name, hook_fn) for name in wanted]
            if query_chunk is None:
                compat.run_until_stopped(model, batch.tokens, fwd_hooks, **stop)
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
                    block_acts = {**acts, "pattern": batch.scored_pattern(block)}
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
                compat.run_until_stopped(model, batch.tokens, fwd_hooks, **stop)
    finally:
        if needs_result:
            model.set_use_attn_result(old_result)


def _stop_kwargs(model, wanted, analyses, query_chunk) -> dict:
    """``stop_at_layer`` just after the last layer any analysis reads: no final norm, no unembedding,
    no later blocks. ``{}`` (the whole forward) for a model whose forward has no ``stop_at_layer``."""
    layers = [layer for layer, _ in wanted.values()]
    if query_chunk is not None and any("pattern" in a.hooks for a in analyses):
        layers.append(model.cfg.n_layers - 1)  # chunked patterns are read inside every attention
    if "stop_at_layer" not in inspect.signature(model.forward).parameters:
        return {}
    return {"stop_at_layer": max(layers) + 1}


def _add_parts(a, b):
    """Add two blocks' results: ratios add numerators and denominators, states add key by key."""
    if isinstance(a, PromptRatio):
        return PromptRatio(a.numerator + b.numerator, a.denominator + b.denominator)
    return {k: a[k] + b[k] for k in a}
