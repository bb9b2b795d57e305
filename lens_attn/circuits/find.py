"""``circuit(model)``: screen every edge into the chosen receivers, path-patch the top ones, check
faithfulness.

    >>> result = lens_attn.circuit(model, ["L1H3"], top_k=4)   # default receivers: induction heads
    >>> sorted(e.name for e in result.circuit_edges() if e.input in ("q", "k"))
    ['L0H0 -> L1H3.k', 'L0H1 -> L1H3.q']
    >>> table = result.to_dataframe()                           # every edge; measured: path_patching

Steps, per batch of equal-length prompts (``activations.clean_run``: one cached forward pass):

1. receivers: the heads given, else every head whose ``score`` on the probes is at least
   ``min_score`` (the label's threshold), else the ``n_receivers`` best;
2. screen (``circuits.screen``): every earlier head into every receiver's ``q``, ``k`` and ``v``, and
   every head into the logits, to first order;
3. path patching (``circuits.paths``): the ``top_k`` head-to-head edges the screen ranks highest
   (by the share of the receiver's clean score they remove; ``v``: of the largest receiver's
   direct effect)
   and the ``top_logits`` strongest direct edges, exactly;
4. faithfulness (``circuits.faithfulness``) of the heads on the kept edges (effect >= ``keep`` and
   more than two standard errors above 0), plus the receivers.

Effects are means over prompts with their standard errors; ``method`` says what a cut sender
outputs instead (``mean``: its mean over the batch's other prompts at each position; ``zero``).
"""

import time

import torch

from lens_attn.circuits.activations import CleanRun, CutMethod, Task, clean_run
from lens_attn.circuits.faithfulness import faithfulness as run_faithfulness
from lens_attn.circuits.paths import patch_logits, patch_receiver
from lens_attn.circuits.receiver import (
    ANSWER_SCORES,
    RECEIVER_SCORES,
    ReceiverScore,
    score_target,
)
from lens_attn.circuits.result import CircuitResult, Edge
from lens_attn.circuits.screen import INPUTS, screen_logits, screen_receiver
from lens_attn.circuits.weights import attention_weights
from lens_attn.errors import InputError
from lens_attn.heads import Head, head_label, resolve_heads
from lens_attn.probes import Probe

_METRIC = {"q": "receiver {score} score", "k": "receiver {score} score",
           "v": "receiver direct effect on {task} metric", "logits": "{task} metric"}  # fmt: skip


def _batches(probes: list[Probe], batch_size: int) -> list[list[Probe]]:
    by_length: dict[int, list[Probe]] = {}
    for p in probes:
        by_length.setdefault(len(p.tokens), []).append(p)
    return [
        group[i : i + batch_size]
        for group in by_length.values()
        for i in range(0, len(group), batch_size)
    ]


def _mean_stderr(per_prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error over the last axis (prompts)."""
    n = per_prompt.shape[-1]
    std = (
        per_prompt.std(-1)
        if n > 1 and per_prompt.numel()
        else torch.full_like(per_prompt[..., 0], float("nan"))
    )
    return per_prompt.mean(-1), std / n**0.5


def choose_receivers(
    model, probes, score: str, *, min_score: float, n_receivers: int, max_receivers: int
) -> list[Head]:
    """Heads at or above ``min_score`` on ``score`` (the ``max_receivers`` best of them), else the
    ``n_receivers`` best; layers >= 1; sorted."""
    from lens_attn.scoring.runner import score_heads

    grid = score_heads(model, probes, scores=[score], progress=False)[score].clone()
    grid[0] = float("-inf")  # layer 0 has no earlier heads to be fed by
    ranked = sorted(((float(v), (i // grid.shape[1], i % grid.shape[1]))
                     for i, v in enumerate(grid.flatten().tolist())), reverse=True)  # fmt: skip
    above = [h for v, h in ranked if v >= min_score][: max(max_receivers, 1)]
    return sorted(above if above else [h for _, h in ranked[:n_receivers]])


def circuit(
    model,
    receivers=None,
    *,
    task: Task = "induction",
    score: ReceiverScore = "induction",
    probes: "list[Probe] | None" = None,
    method: CutMethod = "mean",
    min_score: float = 0.4,
    n_receivers: int = 4,
    max_receivers: int = 12,
    top_k: int = 40,
    top_logits: int = 10,
    keep: float = 0.05,
    steps: int = 0,
    faithfulness: bool = True,
    labels: "dict[str, list[str]] | None" = None,
    batch_size: int = 16,
    progress: bool = False,
) -> CircuitResult:
    """Which earlier heads feed ``receivers`` through their ``q``, ``k``, ``v``, and which heads
    write the answer directly (module docstring).

    Args:
        receivers: head spec (``["L1H3", (2, 0)]``); None: chosen by ``score`` (module docstring).
        task: ``induction`` (repeated random tokens; metric: the correct token's logit minus the
            mean logit on the repeated half, and ``-induction_loss`` for faithfulness) or ``ioi``
            (probes with answers; metric: IO minus S logit).
        score: the receivers' own attention score (``receiver.ReceiverScore``; ``io`` and ``s2``
            need IOI probes and given receivers).
        min_score / n_receivers / max_receivers: receivers chosen when none are given.
        probes: the prompts; default ``induction_probes(model, n_per_period=16)`` (``ioi_probes``).
        method: what a cut sender outputs: the ``mean`` over the batch's other prompts, or ``zero``.
        top_k / top_logits: edges measured exactly, ranked by the screen.
        keep: the smallest effect of an edge kept in the circuit (on its own metric).
        steps: the screen's gradient, at the clean input (0, EAP) or averaged over ``steps``
            points towards every earlier head cut (EAP-IG); 0 ranked best on SmolLM2.
        faithfulness: also run the faithfulness test (3 forward passes per batch).
        labels: head name -> labels, carried to the result for drawing.
    """
    if task not in ("induction", "ioi"):
        raise InputError(f"unknown task {task!r}; valid: induction, ioi")
    if score not in RECEIVER_SCORES:
        raise InputError(f"unknown receiver score {score!r}; valid: {', '.join(RECEIVER_SCORES)}")
    if method not in ("mean", "zero"):
        raise InputError(f"unknown method {method!r}; valid: mean, zero")
    if probes is None:
        from lens_attn.probes import induction_probes, ioi_probes

        probes = (
            induction_probes(model, n_per_period=16) if task == "induction" else ioi_probes(model)
        )
    start = time.perf_counter()
    if receivers is None and score in ANSWER_SCORES:
        raise InputError(f"score={score!r} has no head scores to choose receivers from; give "
                         "receivers=[...] (e.g. the top direct heads of a first run)")  # fmt: skip
    if receivers is None:
        chosen = choose_receivers(model, probes, score, min_score=min_score,
                                  n_receivers=n_receivers, max_receivers=max_receivers)  # fmt: skip
    else:
        chosen = resolve_heads(model, receivers)
    if any(layer == 0 for layer, _ in chosen):
        raise InputError(f"receivers {[head_label(*h) for h in chosen]}: layer-0 heads have no "
                         "earlier heads to be fed by; valid: heads of layers >= 1")  # fmt: skip
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    weights = {layer: attention_weights(model, layer) for layer in range(n_layers)}
    receiver_layers = sorted({layer for layer, _ in chosen})
    batches = _batches(probes, batch_size)

    # 1 + 2: one cached pass per batch, the screen from it
    screens: dict[Head, list[torch.Tensor]] = {h: [] for h in chosen}
    clean_scores: dict[Head, list[torch.Tensor]] = {h: [] for h in chosen}
    clean_direct: dict[Head, list[torch.Tensor]] = {h: [] for h in chosen}
    logit_screen, task_values = [], []
    for i, batch in enumerate(batches):
        run, cuts = _prepare(model, batch, receiver_layers, task, method)
        target = score_target(model, run.tokens, score, run.answers)
        for h in chosen:
            effects, s, d = screen_receiver(run, weights, h, target, cuts, steps=steps)
            screens[h].append(effects)
            clean_scores[h].append(s)
            clean_direct[h].append(d)
        logit_screen.append(screen_logits(run, weights, cuts))
        task_values.append(run.answer.metric(run.resid_final))
        if progress:
            print(f"circuit screen: batch {i + 1}/{len(batches)}", flush=True)
    screen_s = time.perf_counter() - start
    screen = {h: _mean_stderr(torch.cat(v, dim=-1)) for h, v in screens.items()}  # [in, L, H]
    logits = _mean_stderr(torch.cat(logit_screen, dim=-1))  # [layer, head]
    task_value = float(torch.cat(task_values).mean())

    receivers_info, clean_value = {}, {}
    for h in chosen:
        s_mean, s_err = _mean_stderr(torch.cat(clean_scores[h]))
        d_mean, _ = _mean_stderr(torch.cat(clean_direct[h]))
        receivers_info[head_label(*h)] = {"score": score, "clean": float(s_mean),
                                         "clean_stderr": float(s_err), "direct": float(d_mean)}  # fmt: skip
        clean_value[h] = {"q": float(s_mean), "k": float(s_mean), "v": float(d_mean)}
    clean_value["logits"] = {"logits": task_value}

    # the edges to measure exactly: the screen's top head-to-head edges, ranked by the share of
    # the receiver's clean score (q, k) they remove, or (v) of the largest direct effect of any
    # receiver (a receiver that hardly writes the answer would give its v edges huge shares of
    # almost nothing); and the top direct edges
    largest_direct = max((abs(clean_value[h]["v"]) for h in chosen), default=0.0)
    scale = {h: {"q": abs(clean_value[h]["q"]), "k": abs(clean_value[h]["k"]), "v": largest_direct}
             for h in chosen}  # fmt: skip
    candidates = [
        (_fraction(float(screen[h][0][i, layer, j]), scale[h][kind]), (h, kind, (layer, j)))
        for h in chosen
        for i, kind in enumerate(INPUTS)
        for layer in range(h[0])
        for j in range(n_heads)
    ]
    top = [edge for _, edge in sorted(candidates, key=lambda c: -c[0])[:top_k]]
    direct = [(layer, j) for layer in range(n_layers) for j in range(n_heads)]
    top_direct = sorted(direct, key=lambda s: -float(logits[0][s]))[:top_logits]

    # 3: exact path patching, per receiver and input, the senders vectorised
    start = time.perf_counter()
    groups: dict[tuple[Head, str], list[Head]] = {}
    for h, kind, sender in top:
        groups.setdefault((h, kind), []).append(sender)
    exact: dict[tuple[Head, str], list[torch.Tensor]] = {key: [] for key in groups}
    exact_logits: list[torch.Tensor] = []
    for i, batch in enumerate(batches):
        run, cuts = _prepare(model, batch, receiver_layers, task, method)
        target = score_target(model, run.tokens, score, run.answers)
        for (h, kind), senders in groups.items():
            exact[(h, kind)].append(patch_receiver(run, weights, cuts, h, kind, senders, target))
        exact_logits.append(patch_logits(run, weights, cuts, top_direct))
        if progress:
            print(f"circuit path patching: batch {i + 1}/{len(batches)}", flush=True)
    exact_s = time.perf_counter() - start
    measured: dict[tuple, tuple[float, float]] = {}
    for (h, kind), senders in groups.items():
        mean, err = _mean_stderr(torch.cat(exact[(h, kind)], dim=-1))
        for n, sender in enumerate(senders):
            measured[(h, kind, sender)] = (float(mean[n]), float(err[n]))
    mean, err = _mean_stderr(torch.cat(exact_logits, dim=-1))
    for n, sender in enumerate(top_direct):
        measured[("logits", "logits", sender)] = (float(mean[n]), float(err[n]))

    # the edge table: every screened edge; the measured ones carry their exact effect
    keys = [(h, kind, (layer, j)) for h in chosen for kind in INPUTS
            for layer in range(h[0]) for j in range(n_heads)]  # fmt: skip
    keys += [("logits", "logits", s) for s in direct]
    edges = []
    for h, kind, sender in keys:
        if h == "logits":
            est = (float(logits[0][sender]), float(logits[1][sender]))
        else:
            i = INPUTS.index(kind)
            est = (float(screen[h][0][i][sender]), float(screen[h][1][i][sender]))
        effect, err = measured.get((h, kind, sender), est)
        edges.append(Edge(
            sender=head_label(*sender),
            receiver="logits" if h == "logits" else head_label(*h),
            input=kind,
            effect=effect,
            stderr=err,
            method="path_patching" if (h, kind, sender) in measured else "screen",
            screen=est[0],
            fraction=_fraction(effect, clean_value[h][kind]),
            metric=_METRIC[kind].format(score=score, task=task),
        ))  # fmt: skip
    edges.sort(key=lambda e: (e.method != "path_patching", -e.effect))

    from lens_attn.ablation.attribution import rank_correlation

    pairs = torch.tensor([(e.screen, e.effect) for e in edges if e.method == "path_patching"])
    rho = float(rank_correlation(pairs[:, 0], pairs[:, 1])) if len(pairs) > 2 else float("nan")
    result = CircuitResult(
        edges=edges,
        receivers=receivers_info,
        labels=dict(labels or {}),
        passes={
            "batches": len(batches),
            "prompts": len(probes),
            "screen_forward_passes": len(batches),
            "screen_receiver_backwards": len(batches) * len(chosen),
            "exact_forward_passes": len(batches),
            "exact_edge_recomputes": len(batches) * len(measured),
            "edges_screened": len(edges),
            "edges_measured": len(measured),
            "path_patching_forward_passes_all_edges": len(batches) * len(edges),
        },
        spearman=rho,
        settings={
            "task": task,
            "score": score,
            "method": method,
            "top_k": top_k,
            "top_logits": top_logits,
            "keep": keep,
            "min_score": min_score,
            "screen_s": screen_s,
            "exact_s": exact_s,
        },  # fmt: skip
    )
    if faithfulness:
        start = time.perf_counter()
        nodes = set(chosen)
        for (h, _, sender), (effect, err) in measured.items():
            if effect >= keep and effect > 2 * err:
                nodes |= {sender} | ({h} if h != "logits" else set())
        result.faithfulness = run_faithfulness(
            model, probes, sorted(nodes), task=task, method=method
        )
        result.passes["faithfulness_forward_passes"] = 3 * len(batches)
        result.settings["faithfulness_s"] = time.perf_counter() - start
    return result


def _fraction(effect: float, clean: float) -> float:
    return effect / clean if clean else float("nan")


def _prepare(model, batch, receiver_layers, task, method) -> tuple[CleanRun, dict]:
    run = clean_run(model, batch, receiver_layers, task)
    return run, {layer: run.cut(layer, method) for layer in run.z}


def confirmed_circuit(model, labels, confirmation, *, log=print) -> CircuitResult | None:
    """``circuit`` on the induction heads every test of ``confirmation`` confirmed (discover's
    ``circuit=True``); None, with a line to ``log``, when there is none after layer 0.

    ``labels`` is a ``HeadLabels`` (its labels colour the graph); ``confirmation`` a
    ``ConfirmResult``.
    """
    from lens_attn.heads import head_label

    tests: dict[tuple, list] = {}
    for t in confirmation.tests:
        if t.label == "induction":
            tests.setdefault((t.layer, t.head), []).append(t.confirmed)
    heads = sorted(h for h, ok in tests.items() if all(ok) and h[0] > 0)
    if not heads:
        log("circuit: no confirmed induction head after layer 0; skipped")
        return None
    names = {head_label(*h): list(labs) for h, labs in labels.labels.items() if labs}
    result = circuit(model, heads, labels=names)
    log(result.summary(k=8))
    return result
