"""Faithfulness: does the circuit alone do the task?

The circuit's heads run clean; every other attention head is mean-ablated (its ``hook_z`` replaced
by its mean over the same prompts at the same position, ``lens_attn.ablate(method="mean")``); MLPs,
embeddings and the unembedding are kept. The task metric of that run is compared with the clean
model's and with every head mean-ablated:

    share = (circuit - all heads ablated) / (clean - all heads ablated)

Node-level: the circuit is the set of heads on its kept edges; edges between two kept heads that
the circuit does not list are kept too (an edge-level ablation would need a separate forward pass
per cut edge). Three forward passes per batch.
"""

import torch

from lens_attn.ablation.methods import ablate
from lens_attn.circuit.result import Faithfulness
from lens_attn.heads import Head, head_label
from lens_attn.probes import Probe

METRICS = {"induction": "-induction_loss (nats/token on the repeated half)", "ioi": "logit_diff"}


def _metric(model, probes: list[Probe], task: str) -> float:
    from lens_attn.ablation.metrics import induction_loss, logit_diff

    total, n = 0.0, 0
    by_length: dict[int, list[Probe]] = {}
    for p in probes:
        by_length.setdefault(len(p.tokens), []).append(p)
    for group in by_length.values():
        tokens = torch.stack([p.tokens for p in group]).to(model.cfg.device)
        with torch.no_grad():
            logits = model(tokens)
        if task == "induction":
            values = -induction_loss(logits, tokens, periods=[p.period for p in group])
        else:
            answers = torch.tensor([p.answers for p in group], device=logits.device)
            values = logit_diff(logits, tokens, None, answer_tokens=answers)
        total += float(values.sum())
        n += len(group)
    return total / n


def faithfulness(model, probes: list[Probe], nodes: list[Head], *, task: str) -> Faithfulness:
    """The circuit ``nodes`` alone against the clean model and against no heads at all."""
    every = [(layer, h) for layer in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    kept = set(nodes)
    clean = _metric(model, probes, task)
    with ablate(model, [h for h in every if h not in kept], method="mean", reference=probes,
                allow_empty=True):  # fmt: skip
        circuit = _metric(model, probes, task)
    with ablate(model, every, method="mean", reference=probes):
        ablated = _metric(model, probes, task)
    gap = clean - ablated
    return Faithfulness(
        metric=METRICS[task],
        clean=clean,
        circuit=circuit,
        ablated=ablated,
        share=(circuit - ablated) / gap if gap else float("nan"),
        nodes=[head_label(*h) for h in sorted(kept)],
    )
