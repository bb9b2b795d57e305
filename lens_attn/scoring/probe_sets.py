"""Score every head on each probe kind separately, so each label reads the probes that define it.

    >>> scores = score_probe_sets(model, progress=False)
    >>> sorted(scores.per_probe_set)
    ['natural', 'repeated_random', 'repeated_tokens']
    >>> scores.label_score("induction").shape     # induction on repeated random tokens alone
    torch.Size([4, 8])

It runs ``score_heads`` once per probe kind (the same forward passes as one run over every probe)
and merges the kinds into the all-probe grids a single run would give: each score's value is the
prompt-count-weighted mean of the kinds' values, its standard error combined the same way. The
weight-based scores (``WEIGHT_SCORES``) are computed once, on the first kind. ``HeadScores.per_probe_set``
keeps the per-kind results; ``HeadScores.classify`` reads each label from its kind
(``lens_attn.scoring.results.LABEL_PROBES``).
"""

import math
import time

import torch

from lens_attn.probes import Probe, builtin_probes, group_by_kind, probe_hash
from lens_attn.scoring.results import HeadScores
from lens_attn.scoring.runner import default_scores, score_heads

# analyses (and their outputs) computed from the weights: the same on every probe set
WEIGHT_SCORES = ("copying", "ov_rank", "copy_rank", "suppress_rank", "successor")


def score_probe_sets(
    model,
    probes: "list[Probe] | dict[str, list[Probe]] | None" = None,
    *,
    scores: "list[str] | None" = None,
    batch_size: int = 16,
    query_chunk: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> HeadScores:
    """``score_heads`` per probe kind, merged; ``per_probe_set`` holds each kind's own result.

    ``probes``: ``Probe`` objects (grouped by ``kind``), ``{kind: probes}``, or ``None`` for
    ``builtin_probes(model, seed=seed)``.
    """
    if probes is None:
        probes = builtin_probes(model, seed=seed)
    sets = probes if isinstance(probes, dict) else group_by_kind(probes)
    if not sets:
        raise ValueError("no probes to score; give at least one probe")
    names = list(scores) if scores is not None else default_scores(query_chunk)
    weights = list(WEIGHT_SCORES)  # every output of a weight analysis (suppress_rank too)
    per_kind: dict[str, HeadScores] = {}
    seconds: dict[str, float] = {}
    for i, (kind, kind_probes) in enumerate(sets.items()):
        wanted = names if i == 0 else [n for n in names if n not in WEIGHT_SCORES]
        if not wanted:
            continue
        start = time.perf_counter()
        per_kind[kind] = score_heads(
            model, kind_probes, scores=wanted, batch_size=batch_size,
            query_chunk=query_chunk, progress=progress,
        )  # fmt: skip
        seconds[kind] = time.perf_counter() - start
    merged = _merge(per_kind, weights)
    merged.provenance = {
        **next(iter(per_kind.values())).provenance,
        "probe_sets": {kind: len(p) for kind, p in sets.items()},
        "probe_hash": probe_hash([p for kind_probes in sets.values() for p in kind_probes]),
        "probe_seed": seed,
        "seconds": seconds,  # per kind; the first kind also computed the weight scores
    }
    return merged


def _merge(per_kind: dict[str, HeadScores], weight_scores: list[str]) -> HeadScores:
    """All-probe grids: prompt-count-weighted means of the kinds (weight scores from the first)."""
    values, stderr, counts = {}, {}, {}
    first = next(iter(per_kind.values()))
    for name in first.values:
        if name in weight_scores:
            values[name], stderr[name] = first.values[name], first.stderr[name]
            counts[name] = first.counts.get(name, torch.full_like(first.values[name], math.nan))
            continue
        parts = [s for s in per_kind.values() if name in s.values]
        n = [torch.nan_to_num(s.counts.get(name, torch.ones_like(s.values[name]))) for s in parts]
        total = sum(n)
        safe = torch.where(total > 0, total, torch.ones_like(total))
        mean = sum(torch.nan_to_num(s.values[name]) * c for s, c in zip(parts, n, strict=True))
        var = sum(
            torch.nan_to_num(s.stderr[name]) ** 2 * c**2 for s, c in zip(parts, n, strict=True)
        )
        nan = torch.full_like(total, math.nan)
        values[name] = torch.where(total > 0, mean / safe, nan)
        stderr[name] = torch.where(total > 0, var.sqrt() / safe, nan)
        counts[name] = total
    return HeadScores(values, stderr, counts, {}, per_kind)
