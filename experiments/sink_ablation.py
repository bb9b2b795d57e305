"""Zero vs mean ablation of a run's attention_sink heads: why confirm tests the label by mean
ablation (experiments/significance.md, round 3).

    python experiments/sink_ablation.py --run runs/smol \
        --model ~/.cache/lens-attn/SmolLM2-135M-Instruct.Q4_1.gguf --prompts 8

Reads the ``attention_sink`` heads of a ``lens-attn discover`` run folder (its scores), and on
``--prompts`` natural probes (evenly spaced, as discover picks them) ablates each layer's sink
heads together and each head alone, by ``zero`` and by ``mean`` ablation. Prints, per method, each
layer group's mean change of the loss, how many layer groups and heads stay within ``--bound``
nats by the point estimate, and how many have a TOST p-value (two one-sided sign-flip tests,
``lens_attn.ablation.stats.tost_p``) below 0.05 (layer groups) and 0.01 (heads).
"""

import argparse

import torch

from lens_attn.ablation import stats
from lens_attn.ablation.budget import evenly as _evenly
from lens_attn.ablation.confirm import default_probes
from lens_attn.ablation.sweep import ablation_sweep
from lens_attn.loading import load_model
from lens_attn.scoring.results import HeadScores


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a discover run folder (scores.json)")
    parser.add_argument("--model", default=None, help="the run's model (default: bundled)")
    parser.add_argument("--prompts", type=int, default=8, help="natural probes (default: 8)")
    parser.add_argument("--bound", type=float, default=0.05, help="nats (default: 0.05)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = load_model(args.model) if args.model else load_model()
    labels = HeadScores.load(args.run).classify().labels
    sinks = sorted(h for h, labs in labels.items() if "attention_sink" in labs)
    groups = [[h for h in sinks if h[0] == layer] for layer in sorted({h[0] for h in sinks})]
    natural = _evenly(default_probes(model)["natural"], args.prompts)
    units = groups + [[h] for h in sinks]
    out = {}
    for method in ("zero", "mean"):
        sweep = ablation_sweep(model, natural, metric="loss", heads=units, method=method,
                               reference=natural if method == "mean" else None, progress=False)  # fmt: skip
        diff = sweep.ablated_per_prompt - sweep.baseline_per_prompt[None]  # [unit, prompt]
        p = [stats.tost_p(diff[i], args.bound) for i in range(len(units))]
        g = len(groups)
        inside = [i for i in range(g) if abs(float(diff[i].mean())) < args.bound]
        out[method] = {
            "layer_group_deltas": {
                f"L{grp[0][0]}": round(float(diff[i].mean()), 3) for i, grp in enumerate(groups)
            },  # fmt: skip
            "layer_groups_inside": f"{len(inside)} / {g}",
            "heads_in_them": f"{sum(len(groups[i]) for i in inside)} / {len(sinks)}",
            "layer_groups_tost_p<0.05": f"{sum(x < 0.05 for x in p[:g])} / {g}",
            "heads_alone_tost_p<0.01": f"{sum(x < 0.01 for x in p[g:])} / {len(sinks)}",
        }
        print(method, out[method])
    return out


if __name__ == "__main__":
    main()
