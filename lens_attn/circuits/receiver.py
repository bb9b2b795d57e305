"""One receiver head recomputed from its own inputs: its pattern, its score, its direct effect.

A path patch changes a sender's output only where one receiver head reads it (its ``q``, ``k`` or
``v`` input). Instead of hooking ``hook_k`` (shared by every query head of a key/value group under
GQA), :func:`head_pattern` recomputes the receiver's attention from three residual streams, one per
input, with that head's own query weights and its key/value head's weights: patching one query head's
keys never patches another's. The inputs may carry a leading ``sender`` axis, so one call measures
many edges into the same receiver.

The receiver's *score* is one of the linear attention scores of ``lens_attn.scoring.builtin``
(``induction``, ``previous_token``, ``duplicate_token``, ``current_token``): per prompt, the
attention on the score's target keys averaged over its query rows (the same targets and rows the
scoring pass uses, ``normalize="target_rows"``); or, on IOI prompts (``Probe.answers``), the
attention from the last position to the indirect object's name (``io``: what name movers do,
Wang et al. 2022) or to the second occurrence of the subject (``s2``: S-inhibition heads).
"""

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lens_attn.circuits.weights import AttentionWeights, apply_rotary, rms_norm
from lens_attn.errors import InputError

ReceiverScore = Literal[
    "induction", "previous_token", "duplicate_token", "current_token", "io", "s2"
]
RECEIVER_SCORES: tuple[str, ...] = get_args(ReceiverScore)
ANSWER_SCORES = ("io", "s2")  # IOI only: from the last position to the IO name / to S2


@dataclass(frozen=True)
class ScoreTarget:
    """Which attention entries a score counts: ``target`` keys on the counted ``rows``."""

    target: Float[Tensor, "batch query_pos key_pos"]
    rows: Bool[Tensor, "batch query_pos"]

    def per_prompt(self, pattern: Float[Tensor, "*#sender batch query_pos key_pos"]) -> Tensor:
        """The score of each prompt, ``[*sender, batch]``: target mass averaged over the rows."""
        mass = (pattern * self.target).sum(-1)  # [*sender, batch, query_pos]
        rows = self.rows.to(mass.dtype)
        return (mass * rows).sum(-1) / rows.sum(-1).clamp(min=1)


def score_target(
    model, tokens: Int[Tensor, "batch pos"], score: str, answers: Tensor | None = None
) -> ScoreTarget:
    """The targets and rows of score ``score`` on unpadded ``tokens`` (``answers``: ``[batch, 2]``
    IO and S token ids, for ``io`` and ``s2``)."""
    if score not in RECEIVER_SCORES:
        raise InputError(f"unknown receiver score {score!r}; valid: {', '.join(RECEIVER_SCORES)}")
    if score in ANSWER_SCORES:
        return _answer_target(tokens, score, answers)
    from lens_attn.scoring import builtin  # noqa: F401  (registers the linear targets)
    from lens_attn.scoring.fused import LINEAR_TARGETS, KeyAt
    from lens_attn.scoring.protocol import Batch

    mask = torch.ones_like(tokens, dtype=torch.bool)
    batch = Batch(tokens=tokens, mask=mask, probes=[], model=model)
    target, rows = LINEAR_TARGETS[score](batch, slice(None), tokens.device)
    n = tokens.shape[1]
    if isinstance(target, KeyAt):
        query = torch.arange(n)[:, None]
        key = torch.arange(n)[None, :]
        hit = key == (target.key if target.key is not None else query - target.offset)
        target = hit.float().expand(tokens.shape[0], n, n)
    return ScoreTarget(target.float().expand(tokens.shape[0], n, n), rows.bool())


def _answer_target(tokens: Tensor, score: str, answers: Tensor | None) -> ScoreTarget:
    if answers is None:
        raise InputError(f"receiver score {score!r} needs IOI probes (lens_attn.probes.ioi_probes)")
    batch, n = tokens.shape
    name = answers[:, 0 if score == "io" else 1].to(tokens.device)
    hits = tokens[:, :-1] == name[:, None]  # [batch, pos - 1]: the name before the last position
    if score == "s2":  # only the subject's last occurrence
        last = (hits.long() * torch.arange(n - 1, device=tokens.device)).argmax(-1)
        hits = torch.zeros_like(hits).scatter_(1, last[:, None], True) & hits
    target = torch.zeros(batch, n, n, device=tokens.device)
    target[:, -1, :-1] = hits.float()
    rows = torch.zeros(batch, n, dtype=torch.bool, device=tokens.device)
    rows[:, -1] = hits.any(-1)
    return ScoreTarget(target, rows)


def project(x: Float[Tensor, "... pos d_model"], W: Tensor, b: Tensor) -> Tensor:
    return x @ W + b


def head_pattern(
    w: AttentionWeights,
    head: int,
    x_q: Float[Tensor, "*#sender batch pos d_model"],
    x_k: Float[Tensor, "*#sender batch pos d_model"],
    angles,
) -> Float[Tensor, "*#sender batch query_pos key_pos"]:
    """Query head ``head``'s causal pattern, queries from ``x_q`` and keys from ``x_k`` (the
    residual streams before ``ln1``), with its own key/value head's ``W_K``."""
    g = w.kv_head(head)
    q = apply_rotary(project(rms_norm(x_q, w.norm, w.eps), w.W_Q[head], w.b_Q[head]), angles)
    k = apply_rotary(project(rms_norm(x_k, w.norm, w.eps), w.W_K[g], w.b_K[g]), angles)
    scores = q @ k.transpose(-1, -2) / w.attn_scale
    n = scores.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=scores.device).tril()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)


def head_output(
    w: AttentionWeights,
    head: int,
    pattern: Float[Tensor, "*#sender batch query_pos key_pos"],
    x_v: Float[Tensor, "*#sender batch pos d_model"],
) -> Float[Tensor, "*#sender batch query_pos d_model"]:
    """What query head ``head`` writes to the residual stream, values from ``x_v``."""
    g = w.kv_head(head)
    v = project(rms_norm(x_v, w.norm, w.eps), w.W_V[g], w.b_V[g])
    return (pattern @ v) @ w.W_O[head]


@dataclass(frozen=True)
class AnswerDirection:
    """The task metric, read linearly off the final residual stream.

    ``metric(resid) = sum_pos rms_norm(resid)[pos] . directions[pos]``: ``directions`` already holds
    ``ln_final``'s weight, the answer's unembedding direction (the correct token minus the mean over
    the vocabulary for induction; IO minus S for IOI) and ``1 / n_positions``. ``scale`` is the clean
    run's ``1 / rms`` per position, for the frozen-norm (linear) direct effect.
    """

    directions: Float[Tensor, "batch pos d_model"]
    scale: Float[Tensor, "batch pos 1"]
    eps: float

    def metric(self, resid: Float[Tensor, "*#sender batch pos d_model"]) -> Tensor:
        """Per prompt, ``[*sender, batch]``, with ``ln_final`` recomputed."""
        return (rms_norm(resid, None, self.eps) * self.directions).sum((-1, -2))

    def linear(self, write: Float[Tensor, "*#sender batch pos d_model"]) -> Tensor:
        """A write's direct effect on the metric with the clean norm scale frozen, ``[*sender, batch]``."""
        return (write * self.scale * self.directions).sum((-1, -2))
