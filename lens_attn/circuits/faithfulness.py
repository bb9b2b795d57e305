"""Faithfulness: does the circuit alone do the task?

The circuit's heads run clean; every other attention head is ablated (its ``hook_z`` replaced by
its mean over the batch's other prompts at the same position, or zero: the run's ``method``, as for the
edges); MLPs, embeddings and the unembedding are kept. The task metric of that run is compared with
the clean model's and with every head ablated:

    share = (circuit - all heads ablated) / (clean - all heads ablated)

Node-level: the circuit is the set of heads on its kept edges; edges between two kept heads that
the circuit does not list are kept too (an edge-level ablation would need a forward pass per cut
edge). Three forward passes per batch: clean (caching ``hook_z`` for the means), circuit, none.
"""

from collections.abc import Callable

import torch
from transformer_lens.utilities import get_act_name

from lens_attn.circuits.activations import mean_of_others
from lens_attn.circuits.result import Faithfulness
from lens_attn.heads import Head, head_label
from lens_attn.probes import Probe

METRICS = {"induction": "-induction_loss (nats/token on the repeated half)", "ioi": "logit_diff"}


def _metric(task: str, group: list[Probe]) -> Callable:
    from lens_attn.ablation.metrics import induction_loss, logit_diff

    if task == "induction":
        return lambda logits, tokens: (
            -induction_loss(logits, tokens, periods=[p.period for p in group])
        )
    answers = torch.tensor([p.answers for p in group])
    return lambda logits, tokens: logit_diff(logits, tokens, None, answer_tokens=answers)


@torch.no_grad()
def faithfulness(
    model, probes: list[Probe], nodes: list[Head], *, task: str, method: str = "mean"
) -> Faithfulness:
    """The circuit ``nodes`` alone against the clean model and against no heads at all."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    keep = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    for layer, head in nodes:
        keep[layer, head] = True
    by_length: dict[int, list[Probe]] = {}
    for p in probes:
        by_length.setdefault(len(p.tokens), []).append(p)
    totals = {"clean": 0.0, "circuit": 0.0, "ablated": 0.0}
    names = [get_act_name("z", layer) for layer in range(n_layers)]
    for group in by_length.values():
        tokens = torch.stack([p.tokens for p in group]).to(model.cfg.device)
        metric = _metric(task, group)
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
        totals["clean"] += float(metric(logits, tokens).sum())

        def replace(z, hook, kept: torch.Tensor | None, cache=cache):
            layer = int(hook.name.split(".")[1])
            out = mean_of_others(cache[hook.name]) if method == "mean" else torch.zeros_like(z)
            if kept is None:
                return out
            mask = kept[layer].to(z.device)[None, None, :, None]  # [1, 1, head_index, 1]
            return torch.where(mask, z, out)

        for key, kept in (("circuit", keep), ("ablated", None)):
            hooks = [(name, lambda z, hook, kept=kept: replace(z, hook, kept)) for name in names]
            logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
            totals[key] += float(metric(logits, tokens).sum())
    clean, circuit, ablated = (totals[k] / len(probes) for k in ("clean", "circuit", "ablated"))
    gap = clean - ablated
    return Faithfulness(
        metric=METRICS[task],
        clean=clean,
        circuit=circuit,
        ablated=ablated,
        share=(circuit - ablated) / gap if gap else float("nan"),
        nodes=[head_label(*h) for h in sorted(set(nodes))],
    )
