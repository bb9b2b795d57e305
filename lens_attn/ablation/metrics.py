"""Metrics that an ablation is measured with: per prompt, padding-aware.

    >>> from lens_attn.probes import induction_probes, pad
    >>> tokens, mask = pad(induction_probes(model, n_per_period=2))
    >>> logits = model(tokens, attention_mask=mask.long())         # [batch, pos, d_vocab]
    >>> loss(logits, tokens, mask).shape                           # [batch] mean next-token loss
    torch.Size([4])
    >>> per_position_loss(logits, tokens, mask).shape == (4, tokens.shape[1] - 1)  # [batch, pos - 1]
    True

Every built-in metric returns one value per prompt (``[batch]``); a result's value is the mean over
prompts, and its standard error is taken over the prompts. ``mask`` is ``[batch, pos]``, True on
real tokens (``probes.pad`` builds it); ``None`` means every token is real.

==================  ================================================================================
name                per-prompt value
==================  ================================================================================
``loss``            mean next-token cross-entropy over the real predictions (position ``t``
                    predicts token ``t + 1``; both real)
``induction_loss``  the same, only where induction can predict: on ``[BOS, r_1..r_n, r_1..r_n]``
                    the targets ``r_2..r_n`` of the second copy (target positions
                    ``n + 2 .. 2n``); the second copy's first token is unpredictable, left out
``copy_logprob``    minus ``induction_loss``: the mean log-probability of the second copy's
                    targets, the tokens a head could copy from the first copy. What copy
                    suppression holds down (McDougall et al. 2023), so an ablation that *raises*
                    it is the harm (``harm_sign`` +1, like the losses)
``logit_diff``      ``logits[last, a] - logits[last, b]`` at the last real position, for the
                    answer pair ``(a, b)`` (one pair for all prompts, or one per prompt)
``answers_logprob`` ``log(p(a) + p(b))`` at the last real position: the probability of both
                    answers (on IOI sentences, the two names in context). What copy suppression
                    holds down there: an ablation that *raises* it is the harm (``harm_sign`` +1)
``accuracy``        share of real predictions whose top-1 logit is the next token
callable            ``fn(logits, tokens) -> scalar``, called once per prompt with that prompt's
                    real tokens only (``logits [1, n, d_vocab]``, ``tokens [1, n]``)
==================  ================================================================================

Lower is better for the two losses; higher is better for ``logit_diff`` and ``accuracy``. Deltas are
always ``ablated - baseline``, so a harmful ablation has a positive loss delta and a negative
``logit_diff``/``accuracy`` delta.
"""

from collections.abc import Callable, Sequence
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

MetricName = Literal[
    "loss", "induction_loss", "copy_logprob", "logit_diff", "answers_logprob", "accuracy"
]
METRICS: tuple[str, ...] = get_args(MetricName)
MetricFn = Callable[[Tensor, Tensor], Tensor | float]
HIGHER_IS_BETTER = ("logit_diff", "accuracy")
ANSWER_METRICS = ("logit_diff", "answers_logprob")  # need an answer pair per prompt
LAST_POSITION_METRICS = ANSWER_METRICS  # read each prompt's last real position only
PERIOD_METRICS = ("induction_loss", "copy_logprob")  # read the second copy of [BOS, r, r]


def harm_sign(metric: str) -> int:
    """``+1`` where a harmful ablation raises the metric (the losses), ``-1`` where it lowers it."""
    return -1 if metric in HIGHER_IS_BETTER else 1


def _real(tokens: Tensor, mask: Tensor | None) -> Tensor:
    return torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.to(tokens.device)


def real_predictions(
    tokens: Int[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"] | None = None
) -> Bool[Tensor, "batch pos-1"]:
    """Positions ``t`` whose prediction of ``t + 1`` is real: both tokens are not padding."""
    real = _real(tokens, mask)
    return real[:, 1:] & real[:, :-1]


def _wide(x: Tensor) -> Tensor:
    """float32 for half-precision logits; float64 stays float64."""
    return x if x.dtype == torch.float64 else x.float()


def per_position_loss(
    logits: Float[Tensor, "batch pos d_vocab"],
    tokens: Int[Tensor, "batch pos"],
    mask: Bool[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, "batch pos-1"]:
    """Loss of predicting ``tokens[:, t + 1]`` at position ``t``; NaN where either is padding."""
    valid = real_predictions(tokens, mask).to(logits.device)
    nll = _nll_at(logits, tokens, valid)
    return torch.where(valid, nll, torch.full_like(nll, float("nan")))


def _nll_at(logits: Tensor, tokens: Tensor, where: Tensor) -> Tensor:
    """Next-token loss ``[batch, pos - 1]`` where ``where`` is True, 0 elsewhere.

    One fused cross-entropy over every position (the last one against a dummy target): cheaper than
    copying out the chosen positions first, even when only half of them are chosen.
    """
    batch, n_pos, d_vocab = logits.shape
    targets = torch.zeros(batch, n_pos, dtype=torch.long, device=logits.device)
    targets[:, :-1] = tokens.to(logits.device)[:, 1:]
    nll = F.cross_entropy(
        _wide(logits).reshape(batch * n_pos, d_vocab), targets.reshape(-1), reduction="none"
    ).reshape(batch, n_pos)[:, :-1]
    return torch.where(where, nll, torch.zeros_like(nll))


def _masked_mean(values: Tensor, where: Tensor, what: str) -> Tensor:
    count = where.sum(dim=-1)
    if bool((count == 0).any()):
        row = int((count == 0).nonzero()[0])
        raise ValueError(f"prompt {row} has no position to measure {what} on (too short?)")
    return torch.where(where, values, torch.zeros_like(values)).sum(dim=-1) / count


def loss(
    logits: Float[Tensor, "batch pos d_vocab"],
    tokens: Int[Tensor, "batch pos"],
    mask: Bool[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, " batch"]:
    """Mean next-token loss of each prompt over its real predictions."""
    valid = real_predictions(tokens, mask).to(logits.device)
    return _masked_mean(_nll_at(logits, tokens, valid), valid, "the loss")


def repeat_period(tokens: Int[Tensor, " pos"]) -> int:
    """Period ``n`` of a probe ``[BOS, r_1..r_n, r_1..r_n]``; ValueError if it doesn't repeat."""
    length = len(tokens)
    n = (length - 1) // 2
    if length < 5 or length % 2 == 0 or not torch.equal(tokens[1 : n + 1], tokens[n + 1 :]):
        raise ValueError(
            "induction_loss needs repeated probes [BOS, r_1..r_n, r_1..r_n] "
            f"(lens_attn.induction_probes); a prompt of {length} tokens is not one"
        )
    return n


def induction_targets(
    tokens: Int[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"] | None, periods: Sequence[int]
) -> Bool[Tensor, "batch pos-1"]:
    """Positions ``t`` whose target ``t + 1`` is ``r_2..`` of the second copy: ``t >= n + 1``."""
    valid = real_predictions(tokens, mask)
    t = torch.arange(tokens.shape[1] - 1, device=tokens.device)
    first = torch.tensor([int(p) + 1 for p in periods], device=tokens.device)
    return valid & (t[None, :] >= first[:, None])


def induction_loss(
    logits: Float[Tensor, "batch pos d_vocab"],
    tokens: Int[Tensor, "batch pos"],
    mask: Bool[Tensor, "batch pos"] | None = None,
    *,
    periods: Sequence[int] | None = None,
) -> Float[Tensor, " batch"]:
    """Mean loss on the repeated half of induction probes (see the module docstring).

    ``periods`` gives each prompt's period ``n``; ``None`` reads it from the tokens.
    """
    real = _real(tokens, mask)
    if periods is None:
        periods = [repeat_period(row[r].cpu()) for row, r in zip(tokens, real, strict=True)]
    if len(periods) != tokens.shape[0]:
        raise ValueError(f"periods has {len(periods)} entries for {tokens.shape[0]} prompts")
    where = induction_targets(tokens, mask, periods).to(logits.device)
    return _masked_mean(_nll_at(logits, tokens, where), where, "induction_loss")


def accuracy(
    logits: Float[Tensor, "batch pos d_vocab"],
    tokens: Int[Tensor, "batch pos"],
    mask: Bool[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, " batch"]:
    """Share of each prompt's real predictions whose top-1 token is the next token."""
    hit = (logits[:, :-1].argmax(dim=-1) == tokens[:, 1:].to(logits.device)).float()
    valid = real_predictions(tokens, mask).to(logits.device)
    return _masked_mean(hit, valid, "accuracy")


def _last_logits(logits: Tensor, tokens: Tensor, mask: Tensor | None) -> Tensor:
    """``[batch, d_vocab]``: each prompt's logits at its last real position, float32 or wider."""
    real = _real(tokens, mask).to(logits.device)
    last = real.long().cumsum(dim=1).argmax(dim=1)  # index of the last real token
    return _wide(logits[torch.arange(logits.shape[0], device=logits.device), last])


def logit_diff(
    logits: Float[Tensor, "batch pos d_vocab"],
    tokens: Int[Tensor, "batch pos"],
    mask: Bool[Tensor, "batch pos"] | None = None,
    *,
    answer_tokens: Int[Tensor, "batch 2"],
) -> Float[Tensor, " batch"]:
    """``logits[last, a] - logits[last, b]`` at each prompt's last real position."""
    final = _last_logits(logits, tokens, mask)
    pair = final.gather(-1, answer_tokens.to(logits.device))  # [batch, 2]
    return pair[:, 0] - pair[:, 1]


def answers_logprob(
    logits: Float[Tensor, "batch pos d_vocab"],
    tokens: Int[Tensor, "batch pos"],
    mask: Bool[Tensor, "batch pos"] | None = None,
    *,
    answer_tokens: Int[Tensor, "batch 2"],
) -> Float[Tensor, " batch"]:
    """``log(p(a) + p(b))`` at each prompt's last real position (module docstring)."""
    logprobs = _last_logits(logits, tokens, mask).log_softmax(dim=-1)
    return logprobs.gather(-1, answer_tokens.to(logits.device)).logsumexp(dim=-1)


def resolve_answer_tokens(model, answer_tokens, batch: int) -> Int[Tensor, "batch 2"]:
    """``(a, b)`` (ids or single-token strings) or ``[batch, 2]`` ids -> ``[batch, 2]``."""
    if answer_tokens is None:
        raise ValueError(
            "metric='logit_diff' needs answer_tokens=(correct, incorrect), ids or strings"
        )
    if isinstance(answer_tokens, Tensor):
        ids = answer_tokens.long()
        if ids.ndim == 1:
            ids = ids[None]
    else:
        if len(answer_tokens) != 2:
            raise ValueError(
                f"answer_tokens must be a pair (correct, incorrect), got {answer_tokens!r}"
            )
        ids = torch.tensor([[_token_id(model, t) for t in answer_tokens]])
    if ids.ndim != 2 or ids.shape[1] != 2 or ids.shape[0] not in (1, batch):
        raise ValueError(
            f"answer_tokens must be [2] or [{batch}, 2] token ids, got {tuple(ids.shape)}"
        )
    d_vocab = model.cfg.d_vocab
    if bool(((ids < 0) | (ids >= d_vocab)).any()):
        raise ValueError(f"answer token ids must be in 0..{d_vocab - 1}, got {ids.tolist()}")
    return ids.expand(batch, 2).cpu()


def _token_id(model, token: int | str) -> int:
    if isinstance(token, str):
        return int(model.to_single_token(token))
    return int(token)


def check_metric(metric: MetricName | MetricFn) -> str:
    """Validate ``metric`` and return its name (a callable's ``__name__``)."""
    if callable(metric):
        return getattr(metric, "__name__", type(metric).__name__)
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)} or a callable")
    return metric


def _scalar(value, name: str) -> Tensor:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value))
    if isinstance(value, Tensor) and value.numel() == 1 and value.is_floating_point():
        return value.reshape(())
    shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
    raise ValueError(
        f"metric callable {name!r} must return a scalar (a float or a one-element float tensor) "
        f"per prompt; it returned {shape}"
    )


def per_prompt(
    metric: MetricName | MetricFn,
    logits: Float[Tensor, "batch pos d_vocab"],
    tokens: Int[Tensor, "batch pos"],
    mask: Bool[Tensor, "batch pos"] | None = None,
    *,
    periods: Sequence[int] | None = None,
    answer_tokens: Int[Tensor, "batch 2"] | None = None,
) -> Float[Tensor, " batch"]:
    """Any metric (name or callable) as one value per prompt; differentiable in ``logits``."""
    name = check_metric(metric)
    if callable(metric):
        real = _real(tokens, mask)
        values = []
        for row in range(tokens.shape[0]):
            n = int(real[row].sum())
            out = metric(logits[row : row + 1, :n], tokens[row : row + 1, :n])
            values.append(_scalar(out, name).to(logits.device, torch.float32))
        return torch.stack(values)
    if metric == "loss":
        return loss(logits, tokens, mask)
    if metric == "induction_loss":
        return induction_loss(logits, tokens, mask, periods=periods)
    if metric == "copy_logprob":
        return -induction_loss(logits, tokens, mask, periods=periods)
    if metric == "accuracy":
        return accuracy(logits, tokens, mask)
    if answer_tokens is None:
        raise ValueError(
            f"metric={metric!r} needs answer_tokens=(correct, incorrect), ids or strings"
        )
    if metric == "answers_logprob":
        return answers_logprob(logits, tokens, mask, answer_tokens=answer_tokens)
    return logit_diff(logits, tokens, mask, answer_tokens=answer_tokens)
