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


def _ioi_prompts(batch: Batch, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(rows [n], io_pos [n], direction [n, d_model])`` for the ``n`` prompts of the batch that
    are IOI sentences (answers given, IO among the tokens), or None when there are none; cached
    per batch. Only the answers' columns of ``W_U`` are read (the whole of it is 28M numbers on
    SmolLM2)."""
    key = ("ioi_prompts", device)
    if key not in batch.scratch:
        batch.scratch[key] = None
        given = [i for i, p in enumerate(batch.probes) if p.answers is not None]
        if given:
            answers = torch.tensor([batch.probes[i].answers for i in given])  # [n, 2]: IO, S
            tokens, mask = batch.tokens.cpu()[given], batch.mask.cpu()[given]
            is_io = (tokens == answers[:, :1]) & mask
            keep = is_io.any(-1)
            if keep.any():
                rows = torch.tensor(given)[keep]
                io_pos = is_io[keep].float().argmax(-1)  # IO's first occurrence (it occurs once)
                w_u = batch.model.W_U
                w_u = w_u[:, answers[keep].flatten().to(w_u.device)].float()
                weight = _final_norm_weight(batch.model)
                if weight is not None:
                    w_u = weight[:, None] * w_u  # [d_model, 2n]: IO, S, IO, S, ...
                direction = (w_u[:, 0::2] - w_u[:, 1::2]).T  # [n, d_model]
                batch.scratch[key] = (rows.to(device), io_pos.to(device), direction.to(device))
    return batch.scratch[key]


class NameMover(Analysis):
    """``name_mover`` and ``negative_name_mover`` (module docstring); stderr over prompts. A
    batch without IOI sentences adds zeros without reading its activations."""

    name = "name_mover"
    outputs = ("name_mover", "negative_name_mover")
    hooks = ("pattern", "z")

    def reduce(self, layer, acts, batch):
        pattern, z = acts["pattern"], acts["z"]  # [b, head, q, k], [b, pos, head, d_head]
        device, n_heads = pattern.device, pattern.shape[1]
        found = _ioi_prompts(batch, device)
        if found is None:
            keys = ("pos_sum", "pos_sq", "neg_sum", "neg_sq", "effect_sum", "count")
            return {k: torch.zeros(n_heads, device=device) for k in keys}
        rows, io_pos, direction = found
        end = batch.mask.to(device)[rows].long().sum(-1) - 1
        attn = pattern[rows, :, end, io_pos].float()  # [n, head]
        w_o = batch.model.blocks[layer].attn.W_O.float().to(device)  # [head, d_head, d_model]
        if w_o.ndim == 2:
            w_o = w_o.reshape(z.shape[2], z.shape[3], -1)
        effect = torch.einsum("bhe,hem,bm->bh", z[rows, end].float(), w_o, direction)
        out = {}
        for name, part in (("pos", attn * (effect > 0)), ("neg", attn * (effect < 0))):
            out[f"{name}_sum"] = part.sum(0)
            out[f"{name}_sq"] = part.pow(2).sum(0)
        out["effect_sum"] = effect.sum(0)
        out["count"] = torch.full((n_heads,), float(len(rows)), device=device)
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
