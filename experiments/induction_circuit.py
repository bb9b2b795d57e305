"""The previous-token -> induction circuit of the bundled checkpoint, shown by ablation.

    python experiments/induction_circuit.py
    python experiments/induction_circuit.py --model DIR --n-per-period 32

An induction head attends from a repeated token to the token after that token's earlier copy. It
can only find that key if the key's residual stream says which token came *before* it: a
previous-token head in an earlier layer writes that, and the induction head's keys read it
(K-composition; Elhage et al. 2021, Olsson et al. 2022). The script tests this, step by step:

1. Score every head on the built-in probes (``score_heads``) and pick, from the scores alone: the
   induction head (top ``induction`` score), the previous-token head (top ``previous_token`` score
   in an earlier layer) and a control head: of the previous-token head's layer, the head without a
   label from ``HeadScores.classify()`` with the lowest ``previous_token`` score (or ``--control``).
2. Induction scores of every head in the induction head's layer on repeated random probes
   (``induction_probes``): clean, with the previous-token head zero-ablated, with the control
   zero-ablated (``with lens_attn.ablate(...): score_heads(...)``: the ablation's ``hook_z`` hook in
   the early layer and the scoring hooks on ``hook_pattern`` run in the same forward passes).
3. Keys or queries: the previous-token head ablated only as the induction layer's *keys* see it
   (its ``hook_k`` taken from the ablated run, everything else clean), or only as its *queries* do.
4. Every head of the previous-token head's layer ablated in turn: the induction head's score, the
   induction loss (``ablation_sweep(metric="induction_loss")``: loss on the second copy) and, for
   each head whose ablation halves the induction head's score, the keys-only / queries-only split.

Writes the figure (per head: clean / previous-token head ablated / control ablated, and keys only /
queries only) to ``--figure`` and every number to ``--results``, each through a temporary file and
a rename; prints the tables and where the files went.
"""

import argparse
from contextlib import nullcontext
from pathlib import Path

import torch

HERE = Path(__file__).parent
FIGURE = HERE / "figures" / "induction_circuit.png"
RESULTS = HERE / "results" / "induction_circuit.json"
CONDITIONS = {  # key in the results -> (legend text, bar colour)
    "clean": ("clean", "tab:blue"),
    "previous_token_ablated": ("{previous_token} ablated", "tab:red"),
    "control_ablated": ("{control} ablated (control)", "tab:gray"),
    "previous_token_keys_only": ("{previous_token} ablated in the keys only", "tab:orange"),
    "previous_token_queries_only": ("{previous_token} ablated in the queries only", "tab:green"),
}
HALVED = 0.5  # step 4 splits a head into keys/queries if its ablation leaves < half the score


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model source (default: bundled checkpoint)")
    parser.add_argument(
        "--n-per-period", type=int, default=16, help="probes per period (23 and 41); default 16"
    )
    parser.add_argument("--seed", type=int, default=0, help="probe seed (default 0)")
    parser.add_argument("--control", default=None, help="control head, e.g. L0H4 (see step 1)")
    parser.add_argument("--figure", type=Path, default=FIGURE, help=f"default: {FIGURE}")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"default: {RESULTS}")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------- choosing heads


def choose_heads(scores, control: str | None = None) -> dict[str, tuple[int, int]]:
    """The induction head, the previous-token head before it, and a control head (step 1)."""
    from lens_attn.heads import parse_head

    ind_layer, ind_head, _ = scores.top("induction", 1)[0]
    ranked = scores.top("previous_token", scores.n_layers * scores.n_heads)
    earlier = [(layer, head) for layer, head, _ in ranked if layer < ind_layer]
    if not earlier:
        raise ValueError(
            f"the top induction head L{ind_layer}H{ind_head} is in layer {ind_layer}: there is "
            "no earlier layer for a previous-token head to feed it from"
        )
    prev = earlier[0]
    if control is not None:
        chosen = parse_head(control, scores.n_layers, scores.n_heads)
        if chosen == prev:
            raise ValueError(f"the control {control!r} is the previous-token head itself")
    else:
        labels = scores.classify().labels
        same_layer = [(prev[0], h) for h in range(scores.n_heads) if h != prev[1]]
        unlabelled = [h for h in same_layer if not labels[h]] or same_layer
        chosen = min(unlabelled, key=lambda h: float(scores["previous_token"][h]))
    return {"induction": (ind_layer, ind_head), "previous_token": prev, "control": chosen}


# ------------------------------------------------------------------------------------ measuring


def layer_scores(model, probes, layer: int, *, ablated=None) -> torch.Tensor:
    """Induction scores ``[head_index]`` of ``layer``, with the heads ``ablated`` zero-ablated."""
    from lens_attn import ablate
    from lens_attn.scoring.runner import score_heads

    with ablate(model, ablated, method="zero") if ablated else nullcontext():
        scores = score_heads(model, probes, scores=["induction"], batch_size=16, progress=False)
    return scores["induction"][layer]


def site_only_scores(model, probes, heads, *, site: str, layer: int) -> torch.Tensor:
    """Induction scores of ``layer`` when only its ``hook_<site>`` (``"q"``/``"k"``) sees ``heads``
    ablated.

    Per probe length, one run with the ablation caches ``blocks.<layer>.attn.hook_<site>``; a clean
    scoring run of the same batch (one forward pass) then gets that activation patched in. The rows
    line up because ``score_heads`` orders prompts by a stable sort on length, which leaves prompts
    of one length in order; a split batch is refused by the shape check. The per-length scores are
    combined, weighted by the number of prompts that counted.
    """
    from transformer_lens.utilities import get_act_name

    from lens_attn import ablate
    from lens_attn.scoring.runner import score_heads

    name = get_act_name(site, layer)
    by_length: dict[int, list[torch.Tensor]] = {}
    for probe in probes:
        by_length.setdefault(len(probe.tokens), []).append(probe.tokens)
    total = torch.zeros(model.cfg.n_heads, dtype=torch.float64)
    count = torch.zeros(model.cfg.n_heads, dtype=torch.float64)
    for rows in by_length.values():
        tokens = torch.stack(rows).to(model.cfg.device)  # [batch, pos], equal lengths: no padding
        with ablate(model, heads, method="zero"):
            _, cache = model.run_with_cache(tokens, names_filter=name, return_type=None)

        def patch(activation, hook, patched=cache[name]):
            if activation.shape != patched.shape:  # score_heads split the batch: refuse
                raise RuntimeError(f"{hook.name}: {activation.shape} is not {patched.shape}")
            return patched

        with model.hooks(fwd_hooks=[(name, patch)]):
            scores = score_heads(
                model, tokens, scores=["induction"], batch_size=len(tokens), progress=False
            )
        n = scores.counts["induction"][layer].double()
        total += scores["induction"][layer].double() * n
        count += n
    return (total / count).float()


def run(model, *, n_per_period: int = 16, seed: int = 0, control: str | None = None) -> dict:
    """Steps 1-4 of the module docstring; every number in a JSON-ready dict."""
    from lens_attn import ablation_sweep, induction_probes
    from lens_attn.heads import head_label
    from lens_attn.probes import probe_hash
    from lens_attn.scoring.results import LABEL_SCORE
    from lens_attn.scoring.runner import score_heads

    # 1. choose the heads from the scores on the built-in probes (the scores labels are read from)
    builtin = score_heads(model, scores=sorted(set(LABEL_SCORE.values())), progress=False)
    labels = builtin.classify().labels
    heads = choose_heads(builtin, control)
    (layer, ind), prev, ctrl = heads["induction"], heads["previous_token"], heads["control"]
    probes = induction_probes(model, n_per_period=n_per_period, seed=seed)

    # 2. + 4. the induction layer's scores: clean, and with each head of prev's layer ablated
    clean = layer_scores(model, probes, layer)
    scan_layer, n_heads = prev[0], model.cfg.n_heads
    scan = {
        h: layer_scores(model, probes, layer, ablated=[(scan_layer, h)]) for h in range(n_heads)
    }
    if ctrl[0] != scan_layer:  # a --control outside the scanned layer
        scan_ctrl = layer_scores(model, probes, layer, ablated=[ctrl])
    else:
        scan_ctrl = scan[ctrl[1]]

    # 3. keys or queries, for prev and for every other head whose ablation halves the score
    split = {}
    for h in range(n_heads):
        if h == prev[1] or float(scan[h][ind]) < HALVED * float(clean[ind]):
            split[h] = {
                site: site_only_scores(model, probes, [(scan_layer, h)], site=site, layer=layer)
                for site in ("k", "q")
            }
    conditions = {
        "clean": clean,
        "previous_token_ablated": scan[prev[1]],
        "control_ablated": scan_ctrl,
        "previous_token_keys_only": split[prev[1]]["k"],
        "previous_token_queries_only": split[prev[1]]["q"],
    }

    # the induction loss with each of those heads ablated, in one batched sweep
    units = [[(scan_layer, h)] for h in range(n_heads)] + (
        [[ctrl]] if ctrl[0] != scan_layer else []
    )
    sweep = ablation_sweep(model, probes, metric="induction_loss", heads=units)
    loss = {
        unit[0]: (ablated, err)
        for unit, ablated, err in zip(
            sweep.units, sweep.ablated.tolist(), sweep.stderr.tolist(), strict=True
        )
    }

    def per_head(values: torch.Tensor) -> dict[str, float]:
        return {head_label(layer, h): float(v) for h, v in enumerate(values.tolist())}

    return {
        "model": str(getattr(model.cfg, "model_name", None)),
        "probes": {
            "kind": "repeated_random",
            "periods": sorted({p.period for p in probes}),
            "n_per_period": n_per_period,
            "seed": seed,
            "probe_hash": probe_hash(probes),
        },
        "method": "zero",
        "heads": {role: head_label(*head) for role, head in heads.items()},
        "builtin_scores": {
            "induction": float(builtin["induction"][layer, ind]),
            "previous_token": float(builtin["previous_token"][prev]),
            "control_previous_token": float(builtin["previous_token"][ctrl]),
            "control_labels": list(labels[ctrl]),
        },
        "induction_layer": layer,
        "induction_scores": {key: per_head(values) for key, values in conditions.items()},
        "top_induction": {key: float(values[ind]) for key, values in conditions.items()},
        "induction_loss": {
            "clean": sweep.baseline,
            "previous_token_ablated": loss[prev][0],
            "previous_token_ablated_stderr": loss[prev][1],
            "control_ablated": loss[ctrl][0],
            "control_ablated_stderr": loss[ctrl][1],
        },
        "scan_layer": scan_layer,
        "layer_scan": [
            {
                "ablated": head_label(scan_layer, h),
                "labels": list(labels[(scan_layer, h)]),
                "induction_loss": loss[(scan_layer, h)][0],
                "mean_induction": float(scan[h].mean()),
                "top_induction": float(scan[h][ind]),
                "top_induction_keys_only": float(split[h]["k"][ind]) if h in split else None,
                "top_induction_queries_only": float(split[h]["q"][ind]) if h in split else None,
            }
            for h in range(n_heads)
        ],
    }


# ------------------------------------------------------------------------------------ reporting


def figure(results: dict):
    """Grouped bars per induction-layer head: ablations (left), keys vs queries (right)."""
    import numpy as np
    from matplotlib.figure import Figure

    scores, heads, top = results["induction_scores"], results["heads"], results["top_induction"]
    names = list(scores["clean"])
    x = np.arange(len(names))
    panels = [
        ("clean", "previous_token_ablated", "control_ablated"),
        ("clean", "previous_token_keys_only", "previous_token_queries_only"),
    ]
    titles = [
        f"zero-ablating {heads['previous_token']}, or the control {heads['control']}",
        f"{heads['previous_token']} ablated only where layer {results['induction_layer']} reads it",
    ]
    fig = Figure(figsize=(12, 4.4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, keys, title in zip(axes, panels, titles, strict=True):
        width = 0.8 / len(keys)
        for i, key in enumerate(keys):
            text, colour = CONDITIONS[key]
            values = [scores[key][name] for name in names]
            offset = (i - (len(keys) - 1) / 2) * width
            ax.bar(x + offset, values, width, label=text.format(**heads), color=colour)
        ax.set_xticks(x, names)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("head")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0, -0.16), ncols=3, frameon=False)
    axes[0].set_ylabel("induction score (repeated random probes)")
    fig.suptitle(
        f"previous-token head {heads['previous_token']} -> induction head {heads['induction']}: "
        f"{heads['induction']} scores {top['clean']:.2f} clean, "
        f"{top['previous_token_ablated']:.2f} with {heads['previous_token']} ablated "
        f"({top['previous_token_keys_only']:.2f} keys only, "
        f"{top['previous_token_queries_only']:.2f} queries only)"
    )
    return fig


def _cell(value: float | None, width: int) -> str:
    return f"{'-' if value is None else f'{value:.3f}':>{width}}"


def table(results: dict) -> str:
    """The before/after tables as text."""
    scores, heads, loss = results["induction_scores"], results["heads"], results["induction_loss"]
    prev, ctrl, ind = heads["previous_token"], heads["control"], heads["induction"]
    columns = ["clean", f"-{prev}", f"-{ctrl} (ctrl)", f"-{prev} keys", f"-{prev} queries"]
    lines = [
        f"induction scores of layer {results['induction_layer']} (zero ablation)",
        f"{'head':<6}" + "".join(f"{c:>15}" for c in columns),
    ]
    for name in scores["clean"]:
        cells = "".join(_cell(scores[key][name], 15) for key in CONDITIONS)
        lines.append(f"{name:<6}{cells}" + ("  <- induction head" if name == ind else ""))
    lines += [
        "",
        "induction loss (nats/token on the second copy; +- standard error over prompts)",
        f"  {'clean':<32}{loss['clean']:.3f}",
        f"  {prev + ' ablated':<32}{loss['previous_token_ablated']:.3f}"
        f" +- {loss['previous_token_ablated_stderr']:.3f}",
        f"  {ctrl + ' ablated (control)':<32}{loss['control_ablated']:.3f}"
        f" +- {loss['control_ablated_stderr']:.3f}",
        "",
        f"each head of layer {results['scan_layer']} ablated in turn ({ind}'s induction score)",
        f"{'ablated':<8}{'labels':<16}{'ind. loss':>10}{'mean ind.':>11}{ind:>9}"
        f"{'keys only':>11}{'queries only':>14}",
    ]
    for row in results["layer_scan"]:
        lines.append(
            f"{row['ablated']:<8}{';'.join(row['labels']) or '-':<16}"
            f"{row['induction_loss']:>10.3f}{row['mean_induction']:>11.3f}"
            f"{row['top_induction']:>9.3f}{_cell(row['top_induction_keys_only'], 11)}"
            f"{_cell(row['top_induction_queries_only'], 14)}"
        )
    return "\n".join(lines)


def write_json(data: dict, path: Path) -> Path:
    """``data`` as indented strict JSON (NaN as null) at ``path``, written atomically."""
    from lens_attn.files import dumps_strict, write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, dumps_strict(data, indent=1) + "\n")


def main(argv: list[str] | None = None, *, model=None) -> dict:
    """Run the experiment on ``model`` (default: load ``--model``); return the results dict."""
    args = parse_args(argv)
    from lens_attn import load_model, save_figure

    if model is None:
        model = load_model(args.model, device="cpu")
    results = run(model, n_per_period=args.n_per_period, seed=args.seed, control=args.control)
    print(table(results))
    print(f"\nwrote {save_figure(figure(results), args.figure, dpi=120)}")
    print(f"wrote {write_json(results, args.results)}")
    return results


if __name__ == "__main__":
    main()
