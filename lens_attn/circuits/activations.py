"""The one cached forward pass a batch of prompts needs: every head's output and the receivers' inputs.

Everything the screen and the path patches compute starts from this pass (``CleanRun``): ``hook_z``
of every layer (a head's output is ``z @ W_O``), ``hook_resid_pre`` of the receiver layers, the last
layer's ``hook_resid_post`` (the input to ``ln_final``) and, on the bridge, the rotary angles.
"""

from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.utilities import get_act_name

from lens_attn.circuits.receiver import AnswerDirection
from lens_attn.circuits.weights import (
    final_norm_weight,
    rotary_angles,
    rotary_hook_names,
    unembedding,
)
from lens_attn.probes import Probe

Task = Literal["induction", "ioi"]
CutMethod = Literal["mean", "zero"]


@dataclass
class CleanRun:
    """One batch of equal-length prompts, run once, clean."""

    tokens: Int[Tensor, "batch pos"]
    z: dict[int, Float[Tensor, "batch pos head_index d_head"]]
    resid_pre: dict[int, Float[Tensor, "batch pos d_model"]]
    resid_final: Float[Tensor, "batch pos d_model"]
    angles: dict[int, tuple[Tensor, Tensor] | None]
    answer: AnswerDirection
    answers: Int[Tensor, "batch 2"] | None = None  # IOI probes: IO and S token ids

    def cut(self, layer: int, method: CutMethod) -> Float[Tensor, "batch pos head_index d_head"]:
        """What cutting ``layer``'s heads takes away: ``z`` minus its replacement, the mean over
        the batch's *other* prompts at each position (:func:`mean_of_others`), or zero."""
        z = self.z[layer]
        return z - mean_of_others(z) if method == "mean" else z


def mean_of_others(z: Float[Tensor, "batch ..."]) -> Float[Tensor, "batch ..."]:
    """Per prompt, the mean of the other prompts (leave-one-out): a plain batch mean would keep
    ``1 / batch`` of each prompt's own activation in its replacement."""
    n = z.shape[0]
    if n < 2:
        raise ValueError("a mean cut needs at least 2 prompts of the same length in a batch")
    return (z.sum(0, keepdim=True) - z) / (n - 1)


def answer_direction(model, probes: list[Probe], tokens: Tensor, resid_final: Tensor, task: Task):
    """The task metric's direction per position (``AnswerDirection``)."""
    W_U = unembedding(model)  # [d_model, d_vocab]
    weight = final_norm_weight(model)
    batch, n = tokens.shape
    directions = torch.zeros(batch, n, W_U.shape[0], dtype=W_U.dtype, device=W_U.device)
    if task == "induction":
        from lens_attn.ablation.metrics import induction_targets

        where = induction_targets(tokens, None, [p.period for p in probes])  # [batch, pos-1]
        nxt = tokens[:, 1:]
        mean = W_U.mean(-1)
        for b, t in where.nonzero().tolist():
            directions[b, t] = W_U[:, nxt[b, t]] - mean
        directions /= where.sum(-1).clamp(min=1)[:, None, None].to(directions.dtype)
    else:
        if any(p.answers is None for p in probes):
            raise ValueError("task='ioi' needs probes with answers (lens_attn.probes.ioi_probes)")
        for b, p in enumerate(probes):
            io, s = p.answers
            directions[b, -1] = W_U[:, io] - W_U[:, s]
    if weight is not None:
        directions = directions * weight
    eps = float(getattr(model.cfg, "eps", 1e-5))
    scale = torch.rsqrt(resid_final.pow(2).mean(-1, keepdim=True) + eps)
    return AnswerDirection(directions, scale, eps)


@torch.no_grad()
def clean_run(model, probes: list[Probe], receiver_layers, task: Task) -> CleanRun:
    """Run ``probes`` (all of one length) once, caching what the circuit stages read."""
    lengths = {len(p.tokens) for p in probes}
    if len(lengths) != 1:
        raise ValueError(f"clean_run takes prompts of one length; got lengths {sorted(lengths)}")
    n_layers = model.cfg.n_layers
    tokens = torch.stack([p.tokens for p in probes]).to(model.cfg.device)
    names = {get_act_name("z", layer) for layer in range(n_layers)}
    names |= {get_act_name("resid_pre", layer) for layer in receiver_layers}
    names |= {get_act_name("resid_post", n_layers - 1)}
    names |= set(rotary_hook_names(model, receiver_layers))
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names, return_type=None)
    resid_final = cache[get_act_name("resid_post", n_layers - 1)]
    n_pos = tokens.shape[1]
    return CleanRun(
        tokens=tokens,
        z={layer: cache[get_act_name("z", layer)] for layer in range(n_layers)},
        resid_pre={layer: cache[get_act_name("resid_pre", layer)] for layer in receiver_layers},
        resid_final=resid_final,
        angles={layer: rotary_angles(model, layer, n_pos, cache) for layer in receiver_layers},
        answer=answer_direction(model, probes, tokens, resid_final, task),
        answers=torch.tensor([p.answers for p in probes]) if task == "ioi" else None,
    )
