"""Name-mover scores on the indirect-object sentences (``lens_attn.probes.ioi_probes``).

    >>> from lens_attn.probes import ioi_probes
    >>> ioi_probes(model)   # the bundled model has no one-token names: no IOI sentences
    []

On a model that has them (SmolLM2-135M)::

    scores = lens_attn.score_heads(model, ioi_probes(model), scores=["name_mover"])
    scores["name_mover"], scores["negative_name_mover"]          # [layer, head_index] each

Wang et al. 2022, "Interpretability in the Wild: a Circuit for Indirect Object Identification in
GPT-2 small", section 3: *name mover* heads attend from the last token (END) to the indirect object
(IO) and copy it into the logits, raising ``logit(IO) - logit(S)``; *negative name movers* attend
to it too but write the opposite. Per IOI prompt and head:

- ``a``: the attention from END to IO's position (the pattern's ``[END, IO]`` entry);
- ``d``: the head's direct effect on the logit difference, ``z[END] W_O (W_U[:, IO] - W_U[:, S])``
  (the final RMSNorm's scaling is positive and the same for every head, so only its weight enters).

``name_mover`` is the mean over prompts of ``a * [d > 0]``; ``negative_name_mover`` of
``a * [d < 0]``. A head scores high when it attends to IO *and* pushes the answer the way its label
says. Prompts without answers (any other probe kind) don't count.

Attention without effect is not name moving: Wang et al. found their name movers by the size of
their direct effect (path patching to the logits) before looking at what they attend to. So a head
scores only if its mean ``d`` carries at least ``MIN_EFFECT_SHARE`` (5%) of all scored heads' mean
push that way (the sum of the positive mean ``d``, or of the negative ones for
``negative_name_mover``); others score 0. On SmolLM2-135M four heads attend from END to IO at
>= 0.15 with ``d > 0`` (L22H7, L23H0, L23H4, L28H1), but their mean direct effects are +0.03,
+0.41, -0.02 and -0.02 logits, against +2.6 for the copy suppressor L23H3 (which attends to the
subject, 0.03 to IO) and +4.9 for all heads with a positive one: only L23H0 moves the name
(``experiments/taxonomy.md``).
"""

import torch

from lens_attn.scoring.ov_circuit import _final_norm_weight
from lens_attn.scoring.protocol import Analysis, Batch
from lens_attn.scoring.registry import register_analysis

MIN_EFFECT_SHARE = 0.05  # of all heads' mean direct push toward (away from) IO (module docstring)


def _answer_direction(batch: Batch, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(direction [batch, d_model], io_pos [batch], has [batch])``, cached per batch."""
    key = ("ioi_direction", device)
    if key not in batch.scratch:
        model = batch.model
        answers = torch.tensor(
            [p.answers if p.answers is not None else (0, 0) for p in batch.probes]
        )
        has = torch.tensor([p.answers is not None for p in batch.probes])
        w_u = model.W_U.float()
        weight = _final_norm_weight(model)
        if weight is not None:
            w_u = weight[:, None] * w_u
        direction = (w_u[:, answers[:, 0]] - w_u[:, answers[:, 1]]).T  # [batch, d_model]
        tokens = batch.tokens.cpu()
        is_io = (tokens == answers[:, :1]) & batch.mask.cpu()
        io_pos = is_io.float().argmax(-1)  # the first occurrence of IO (it occurs once)
        has &= is_io.any(-1)
        batch.scratch[key] = (direction.to(device), io_pos.to(device), has.to(device))
    return batch.scratch[key]


class NameMover(Analysis):
    """``name_mover`` and ``negative_name_mover`` (module docstring); stderr over prompts."""

    name = "name_mover"
    outputs = ("name_mover", "negative_name_mover")
    hooks = ("pattern", "z")

    def reduce(self, layer, acts, batch):
        pattern, z = acts["pattern"], acts["z"]  # [b, head, q, k], [b, pos, head, d_head]
        device = pattern.device
        direction, io_pos, has = _answer_direction(batch, device)
        rows = torch.arange(len(io_pos), device=device)
        end = batch.mask.to(device).long().sum(-1) - 1
        attn = pattern[rows, :, end, io_pos].float()  # [b, head]
        w_o = batch.model.blocks[layer].attn.W_O.float().to(device)  # [head, d_head, d_model]
        if w_o.ndim == 2:
            w_o = w_o.reshape(z.shape[2], z.shape[3], -1)
        effect = torch.einsum("bhe,hem,bm->bh", z[rows, end].float(), w_o, direction)
        weight = has.float()[:, None]
        out = {}
        for name, part in (("pos", attn * (effect > 0)), ("neg", attn * (effect < 0))):
            out[f"{name}_sum"] = (part * weight).sum(0)
            out[f"{name}_sq"] = (part.pow(2) * weight).sum(0)
        out["effect_sum"] = (effect * weight).sum(0)
        out["count"] = weight.sum(0).expand(attn.shape[1]).clone()
        return out

    def finalize(self, state):
        n = state["count"]
        safe = n.clamp_min(1)
        nan = torch.full_like(n, float("nan"))
        effect = state["effect_sum"] / safe  # [layer, head]: mean direct effect on the logit diff
        result = {}
        for name, key, sign in (("name_mover", "pos", 1), ("negative_name_mover", "neg", -1)):
            mean = state[f"{key}_sum"] / safe
            var = (state[f"{key}_sq"] / safe - mean.pow(2)).clamp_min(0) / (n - 1).clamp_min(1)
            push = (sign * effect).clamp_min(0)
            moves = push >= MIN_EFFECT_SHARE * push.sum()
            mean, sd = torch.where(moves, mean, 0.0), torch.where(moves, var.sqrt(), 0.0)
            result[name] = (torch.where(n > 0, mean, nan), torch.where(n > 1, sd, nan))
        return result


register_analysis(NameMover())
