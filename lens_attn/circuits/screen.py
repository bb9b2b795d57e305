"""The screen: every edge into a receiver, to first order, from one gradient per receiver head.

For receiver head ``h`` of layer ``L`` the score is a function of three copies of the residual
stream ``x = hook_resid_pre[L]``, one per input (``q``, ``k``, ``v``). Cutting sender ``j`` of an
earlier layer takes ``D_j = (z_j - replacement) @ W_O[j]`` out of one copy, so the effect is, to
first order (edge attribution patching, Syed et al. 2023; Hanna et al. 2024),

    effect(j -> h.input) = score(x) - score(x - D_j) ~= grad_input score . D_j

One backward pass through the receiver's own attention (not the model) gives the three gradients;
projecting them through every sender's ``W_O`` scores all senders at once. The direct edges
``j -> logits`` are linear with ``ln_final``'s scale frozen: ``D_j . (scale * answer direction)``.
So the screen costs one forward pass per batch (``activations.clean_run``) plus one single-head
backward per receiver head, whatever the number of senders.
"""

import torch
from jaxtyping import Float
from torch import Tensor

from lens_attn.circuits.activations import CleanRun
from lens_attn.circuits.receiver import ScoreTarget, head_output, head_pattern
from lens_attn.circuits.weights import AttentionWeights
from lens_attn.heads import Head

INPUTS = ("q", "k", "v")


def receiver_gradients(
    run: CleanRun,
    w: AttentionWeights,
    receiver: Head,
    target: ScoreTarget,
    total_cut: Float[Tensor, "batch pos d_model"],
    steps: int,
) -> tuple[
    Float[Tensor, "input batch pos d_model"], Float[Tensor, " batch"], Float[Tensor, " batch"]
]:
    """Gradients of the receiver's score (``q``, ``k``) and of its direct effect on the answer
    (``v``) with respect to its three input copies, averaged over ``steps`` points of the straight
    line from the clean input ``x`` to ``x - total_cut`` (every earlier head cut; the midpoint rule,
    as EAP-IG integrates); and the clean score and direct effect."""
    layer, head = receiver
    x = run.resid_pre[layer]
    grads = torch.zeros(len(INPUTS), *x.shape, dtype=x.dtype, device=x.device)
    clean_score = clean_direct = None
    with torch.enable_grad():
        for alpha in [(i + 0.5) / steps for i in range(steps)] if steps else [0.0]:
            point = x.detach() - alpha * total_cut
            x_q, x_k, x_v = (point.clone().requires_grad_(True) for _ in INPUTS)
            pattern = head_pattern(w, head, x_q, x_k, run.angles[layer])
            score = target.per_prompt(pattern)
            direct = run.answer.linear(head_output(w, head, pattern.detach(), x_v))
            g_q, g_k = torch.autograd.grad(score.sum(), (x_q, x_k))
            (g_v,) = torch.autograd.grad(direct.sum(), (x_v,))
            grads += torch.stack([g_q, g_k, g_v]) / max(steps, 1)
    with torch.no_grad():
        pattern = head_pattern(w, head, x, x, run.angles[layer])
        clean_score = target.per_prompt(pattern)
        clean_direct = run.answer.linear(head_output(w, head, pattern, x))
    return grads, clean_score, clean_direct


def screen_receiver(
    run: CleanRun,
    weights: dict[int, AttentionWeights],
    receiver: Head,
    target: ScoreTarget,
    cuts: dict[int, Tensor],
    *,
    steps: int = 0,
) -> tuple[Float[Tensor, "input layer head_index batch"], Tensor, Tensor]:
    """First-order effect of cutting each head of layers ``0..L-1`` on each input of ``receiver``,
    per prompt; and the receiver's clean score and direct effect per prompt. ``steps=0``: the
    gradient at the clean input (EAP); ``steps=m``: averaged along the path (EAP-IG)."""
    layer = receiver[0]
    total = sum(torch.einsum("bphd,hdm->bpm", cuts[i], weights[i].W_O) for i in range(layer))
    grads, score, direct = receiver_gradients(run, weights[layer], receiver, target, total, steps)
    per_layer = []
    for layer in range(receiver[0]):
        g_z = torch.einsum("ibpm,hdm->ibphd", grads, weights[layer].W_O)
        per_layer.append((g_z * cuts[layer]).sum((2, 4)).transpose(1, 2))  # [input, head, batch]
    return torch.stack(per_layer, dim=1), score, direct


def screen_logits(
    run: CleanRun, weights: dict[int, AttentionWeights], cuts: dict[int, Tensor]
) -> Float[Tensor, "layer head_index batch"]:
    """Every head's direct effect on the answer (``ln_final`` scale frozen), per prompt."""
    u = run.answer.scale * run.answer.directions  # [batch, pos, d_model]
    out = []
    for layer in sorted(cuts):
        u_z = torch.einsum("bpm,hdm->bphd", u, weights[layer].W_O)
        out.append((u_z * cuts[layer]).sum((1, 3)).T)
    return torch.stack(out)
