"""``MetricInputs``: a sweep's prompts as padded tokens, mask, periods and answers."""

from dataclasses import dataclass

import torch
from torch import Tensor

from lens_attn.ablation.metrics import (
    ANSWER_METRICS,
    LAST_POSITION_METRICS,
    PERIOD_METRICS,
    per_prompt,
    repeat_period,
)
from lens_attn.ablation.metrics import resolve_answer_tokens as _answers
from lens_attn.probes import Probe, as_probes, check_context, pad, pad_token_id


@dataclass
class MetricInputs:
    """Prompts of one chunk, ready for the model and the metric."""

    tokens: Tensor
    mask: Tensor
    periods: list[int] | None
    answers: Tensor | None

    def repeat(self, n: int) -> "MetricInputs":
        return MetricInputs(
            self.tokens.repeat(n, 1), self.mask.repeat(n, 1),
            None if self.periods is None else self.periods * n,
            None if self.answers is None else self.answers.repeat(n, 1),
        )  # fmt: skip

    def select(self, idx: Tensor) -> "MetricInputs":
        """Prompts ``idx``, padded only to their own longest."""
        n = int(self.mask[idx].sum(1).max())
        return MetricInputs(
            self.tokens[idx, :n], self.mask[idx, :n],
            None if self.periods is None else [self.periods[i] for i in idx.tolist()],
            None if self.answers is None else self.answers[idx],
        )  # fmt: skip

    def first_needed(self, metric) -> int:
        """First position whose logits ``metric`` reads (the earlier ones it never looks at)."""
        return first_needed(metric, self.mask.sum(1).tolist(), self.periods)

    def cut(self, lo: int) -> "MetricInputs":
        """The same prompts seen from position ``lo`` on (periods shifted to match)."""
        return MetricInputs(
            self.tokens[:, lo:], self.mask[:, lo:],
            None if self.periods is None else [p - lo for p in self.periods], self.answers,
        )  # fmt: skip

    def measure(self, metric, logits: Tensor) -> Tensor:
        return per_prompt(
            metric, logits, self.tokens.to(logits.device), self.mask.to(logits.device),
            periods=self.periods, answer_tokens=self.answers,
        ).detach().float().cpu()  # fmt: skip


def first_needed(metric, lengths: list[int], periods: list[int] | None) -> int:
    """First position whose logits ``metric`` reads, for prompts of real ``lengths`` (and induction
    ``periods``): ``induction_loss`` predictions ``t >= period + 1``, ``logit_diff`` the earliest
    last real position, every position for the others."""
    if metric in PERIOD_METRICS:
        return min(periods) + 1
    if metric in LAST_POSITION_METRICS:
        return min(lengths) - 1
    return 0


def prepare(model, tokens_or_probes, metric, answer_tokens) -> tuple[list[Probe], MetricInputs]:
    """Probes, padded tokens, mask, induction periods and answer ids for a metric."""
    probes = as_probes(model, tokens_or_probes)
    check_context(model, probes)
    tokens, mask = pad(probes, pad_id=pad_token_id(model))
    periods = None
    if metric in PERIOD_METRICS:
        periods = [p.period if p.period is not None else repeat_period(p.tokens) for p in probes]
    if metric in ANSWER_METRICS and answer_tokens is None and all(p.answers for p in probes):
        answer_tokens = torch.tensor([p.answers for p in probes])  # the probes' own (ioi_probes)
    answers = _answers(model, answer_tokens, len(probes)) if metric in ANSWER_METRICS else None
    return probes, MetricInputs(tokens, mask, periods, answers)


def bytes_per_row(cfg, n_pos: int, n_unembed: int | None = None) -> int:
    """Float32 peak of one batch row: logits and their log-softmax copies at the ``n_unembed``
    positions the pass unembeds (all ``n_pos`` by default), one layer's attention scores, the MLP.

    An ablated pass on the ``replay``/``resume`` paths unembeds only the positions the metric reads
    (``induction_loss``: the second copy), so its rows are charged for those alone.
    """
    d_mlp = cfg.d_mlp or 4 * cfg.d_model
    n_unembed = n_pos if n_unembed is None else n_unembed
    return 4 * (
        3 * n_unembed * cfg.d_vocab
        + 4 * cfg.n_heads * n_pos**2
        + n_pos * (4 * d_mlp + 8 * cfg.d_model)
    )


def rows_per_pass(
    model, n_pos: int, n_unembed: int, memory_budget_mb: "int | float"
) -> tuple[int, float]:
    """Ablated rows one pass may stack under ``memory_budget_mb`` (replay path), and its MB."""
    per_row = bytes_per_row(model.cfg, n_pos, n_unembed)
    rows = max(1, int(memory_budget_mb * 2**20 // per_row))
    return rows, rows * per_row / 2**20
