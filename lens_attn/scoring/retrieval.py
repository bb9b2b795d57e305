"""The retrieval score on needle-in-a-haystack probes (``lens_attn.probes.retrieval_probes``).

    >>> from lens_attn.probes import retrieval_probes
    >>> scores = lens_attn.score_heads(model, retrieval_probes(model), scores=["retrieval"],
    ...                                progress=False)
    >>> scores["retrieval"].shape
    torch.Size([4, 8])

Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context Factuality", section 2: while
the model copies a needle out of its context, a retrieval head's most-attended key is the token
being copied. Their score is ``|g_h ∩ k| / |k|``: the share of the needle's tokens ``k`` that the head
"copy-pastes", i.e. whose generation step has the head's top attention on that token's position in
the needle. Here the copy is teacher-forced (the probe ends with the needle): for each query ``t``
of the second needle (all but its last token) the token to be produced is ``needle[i + 1]``, and
the head scores a hit when its attention row's argmax is that token's position in the first
needle. The score is the mean share of hits over probes. Wu et al. also require the model itself
to generate the token; that is the model's retrieval accuracy, which ``experiments/taxonomy.md``
reports beside the labels (it is not part of a head's score). Their threshold is 0.1, reached by
under 5% of heads in the models they studied.
"""

import torch

from lens_attn.probes import RETRIEVAL_NEEDLE
from lens_attn.scoring.protocol import Analysis, Batch
from lens_attn.scoring.registry import register_analysis


def _targets(batch: Batch, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(queries [batch, m-1], keys [batch, m-1], has [batch])`` for the retrieval probes."""
    key = ("retrieval_targets", device)
    if key not in batch.scratch:
        m = RETRIEVAL_NEEDLE
        queries = torch.zeros(len(batch.probes), m - 1, dtype=torch.long)
        keys = torch.zeros_like(queries)
        has = torch.zeros(len(batch.probes), dtype=torch.bool)
        for i, probe in enumerate(batch.probes):
            if probe.kind != "retrieval" or probe.period is None:
                continue
            tokens, start = probe.tokens, probe.period + 1  # the second needle's first position
            needle = tokens[start : start + m]
            windows = tokens[: start - m + 1].unfold(0, m, 1) if start >= m else None
            found = (windows == needle).all(-1).nonzero() if windows is not None else []
            if len(needle) != m or len(found) == 0:
                continue
            first = int(found[0])
            queries[i] = torch.arange(start, start + m - 1)
            keys[i] = torch.arange(first + 1, first + m)  # needle[i + 1] in the first needle
            has[i] = True
        batch.scratch[key] = (queries.to(device), keys.to(device), has.to(device))
    return batch.scratch[key]


class Retrieval(Analysis):
    """Wu et al. 2024's retrieval score (module docstring); stderr over probes."""

    name = "retrieval"
    hooks = ("pattern",)

    def reduce(self, layer, acts, batch):
        pattern = acts["pattern"]  # [batch, head_index, query_pos, key_pos]
        queries, keys, has = _targets(batch, pattern.device)
        rows = torch.arange(len(queries), device=pattern.device)[:, None]
        top = pattern[rows, :, queries].argmax(-1)  # [batch, m-1, head_index]
        share = (top == keys[:, :, None]).float().mean(1)  # [batch, head_index]
        weight = has.float()[:, None]
        return {
            "sum": (share * weight).sum(0),
            "sq": (share.pow(2) * weight).sum(0),
            "count": weight.sum(0).expand(share.shape[1]).clone(),
        }

    def finalize(self, state):
        n = state["count"]
        safe = n.clamp_min(1)
        mean = state["sum"] / safe
        var = (state["sq"] / safe - mean.pow(2)).clamp_min(0) / (n - 1).clamp_min(1)
        nan = torch.full_like(n, float("nan"))
        return {"retrieval": (torch.where(n > 0, mean, nan), torch.where(n > 1, var.sqrt(), nan))}


register_analysis(Retrieval())
