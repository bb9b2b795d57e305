"""Path patching, exactly, into one receiver head's ``q``, ``k`` or ``v`` input, per query head.

An edge ``sender -> receiver.input`` is cut by taking the sender's output ``D = (z - replacement)
@ W_O[sender]`` out of the residual stream *only as that input of that receiver head reads it*:
the receiver's attention is recomputed (``receiver.head_pattern``) from ``x - D`` for that input and
the clean ``x`` for the others, ``ln1`` recomputed on each. Every other head, the MLPs and every
other path see the clean run. Under GQA the receiver's keys are computed from its own key/value
head's weights on its own copy of the input, so the other query heads of the group are untouched
(``hook_k`` patching would change them all).

What ``effect`` measures (positive when the cut hurts):

- ``q`` and ``k``: the drop in the receiver's own attention score (``receiver.ScoreTarget``);
- ``v``: the drop in the receiver's direct effect on the task metric (its output read through
  ``ln_final`` with the clean scale frozen and the answer's unembedding direction); the pattern is
  clean, as only the values change;
- ``logits``: the drop in the task metric when the sender's output is taken out of the final
  residual stream only (``ln_final`` recomputed).

The screen (``circuits.screen``) is the first-order approximation of exactly these quantities.
"""

import torch
from jaxtyping import Float
from torch import Tensor

from lens_attn.circuits.activations import CleanRun
from lens_attn.circuits.receiver import ScoreTarget, head_output, head_pattern
from lens_attn.circuits.weights import AttentionWeights
from lens_attn.heads import Head

CHUNK = 16  # senders patched at once (memory: CHUNK * batch * pos * d_model floats)


def sender_writes(
    weights: dict[int, AttentionWeights], cuts: dict[int, Tensor], senders: list[Head]
) -> Float[Tensor, "sender batch pos d_model"]:
    """What cutting each sender takes out of the residual stream."""
    return torch.stack(
        [cuts[layer][:, :, head] @ weights[layer].W_O[head] for layer, head in senders]
    )


@torch.no_grad()
def patch_receiver(
    run: CleanRun,
    weights: dict[int, AttentionWeights],
    cuts: dict[int, Tensor],
    receiver: Head,
    kind: str,
    senders: list[Head],
    target: ScoreTarget,
) -> Float[Tensor, "sender batch"]:
    """The exact effect of cutting each ``sender -> receiver.kind`` edge, per prompt."""
    layer, head = receiver
    w, x, angles = weights[layer], run.resid_pre[layer], run.angles[layer]
    clean_pattern = head_pattern(w, head, x, x, angles)
    if kind == "v":
        clean = run.answer.linear(head_output(w, head, clean_pattern, x))
    else:
        clean = target.per_prompt(clean_pattern)
    out = []
    for start in range(0, len(senders), CHUNK):
        cut = x - sender_writes(weights, cuts, senders[start : start + CHUNK])
        if kind == "q":
            patched = target.per_prompt(head_pattern(w, head, cut, x, angles))
        elif kind == "k":
            patched = target.per_prompt(head_pattern(w, head, x, cut, angles))
        elif kind == "v":
            patched = run.answer.linear(head_output(w, head, clean_pattern, cut))
        else:
            raise ValueError(f"unknown input {kind!r}; valid: q, k, v")
        out.append(clean - patched)
    return torch.cat(out)


@torch.no_grad()
def patch_logits(
    run: CleanRun,
    weights: dict[int, AttentionWeights],
    cuts: dict[int, Tensor],
    senders: list[Head],
) -> Float[Tensor, "sender batch"]:
    """The exact drop of the task metric when each sender is cut from the final residual only."""
    clean = run.answer.metric(run.resid_final)
    out = [clean.new_zeros(0, *clean.shape)]  # no senders: [0, batch]
    for start in range(0, len(senders), CHUNK):
        cut = run.resid_final - sender_writes(weights, cuts, senders[start : start + CHUNK])
        out.append(clean - run.answer.metric(cut))
    return torch.cat(out)
