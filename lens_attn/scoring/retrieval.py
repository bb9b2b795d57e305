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


def _targets(batch: Batch, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(rows [n], queries [n, m-1], keys [n, m-1])`` for the ``n`` retrieval probes of the batch
    whose needle is found, or None when there are none; cached per batch."""
    key = ("retrieval_targets", device)
    if key not in batch.scratch:
        m = RETRIEVAL_NEEDLE
        rows, queries, keys = [], [], []
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
            rows.append(i)
            queries.append(torch.arange(start, start + m - 1))
            keys.append(torch.arange(first + 1, first + m))  # needle[i + 1] in the first needle
        batch.scratch[key] = (
            (torch.tensor(rows, device=device), torch.stack(queries).to(device),
             torch.stack(keys).to(device))
            if rows
            else None
        )  # fmt: skip
    return batch.scratch[key]


class Retrieval(Analysis):
    """Wu et al. 2024's retrieval score (module docstring); stderr over probes. A batch without
    retrieval probes adds zeros without reading its pattern."""

    name = "retrieval"
    hooks = ("pattern",)

    def reduce(self, layer, acts, batch):
        pattern = acts["pattern"]  # [batch, head_index, query_pos, key_pos]
        n_heads, device = pattern.shape[1], pattern.device
        found = _targets(batch, device)
        if found is None:
            return {k: torch.zeros(n_heads, device=device) for k in ("sum", "sq", "count")}
        rows, queries, keys = found
        top = pattern[rows[:, None], :, queries].argmax(-1)  # [n, m-1, head_index]
        share = (top == keys[:, :, None]).float().mean(1)  # [n, head_index]
        return {
            "sum": share.sum(0),
            "sq": share.pow(2).sum(0),
            "count": torch.full((n_heads,), float(len(rows)), device=device),
        }

    def finalize(self, state):
        n = state["count"]
        safe = n.clamp_min(1)
        mean = state["sum"] / safe
        var = (state["sq"] / safe - mean.pow(2)).clamp_min(0) / (n - 1).clamp_min(1)
        nan = torch.full_like(n, float("nan"))
        return {"retrieval": (torch.where(n > 0, mean, nan), torch.where(n > 1, var.sqrt(), nan))}


register_analysis(Retrieval())
