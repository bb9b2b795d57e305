"""Calibrate confirm's p-values under the null: a random "label" set against random sets.

    python experiments/calibrate_confirm.py --out runs/calibrate_confirm
    python experiments/calibrate_confirm.py --model ~/.cache/lens-attn/SmolLM2-135M-Instruct.Q4_1.gguf \
        --sets 60 --out runs/calibrate_confirm_smol

On the bundled checkpoint (or ``--model``), for each test in ``--tests`` and each set size in
``--sizes``, ``--sets`` random head sets (uniform over all heads) are ablated once on
``--prompts`` prompts of the test's probes. Then ``--repeats`` seeded times a random one of them
plays the label's group and ``--n-null`` others the random sets; the "label" is as random as the
null sets, so a calibrated test rejects at 0.05 about 5% of the time. Three group tests are
compared:

- ``rank``: the group's rank among the null sets (confirm's test before: at best 1/(n+1));
- ``prompt``: a sign-flip test over prompts of ``group - mean(null sets)`` per prompt (treats the
  null sets' mean as known: it ignores how much random sets differ from each other);
- ``set``: the t prediction test of the group's mean effect against the null sets' mean effects
  (``stats.prediction_t_p``: confirm's group test).

Prints the false-positive rate at 0.05 of each (with its binomial standard error over the
repeats, which share sets, so the real uncertainty is larger) and writes ``calibration.json``.
"""

import argparse
import json
import math
import os
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a checkpoint (default: the bundled one)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tests", default="natural/loss,repeated_random/induction_loss")
    parser.add_argument("--sizes", default="1,3")
    parser.add_argument("--sets", type=int, default=120)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n-null", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    import lens_attn
    from lens_attn.ablation import stats
    from lens_attn.ablation.budget import evenly as _evenly
    from lens_attn.ablation.confirm import default_probes
    from lens_attn.ablation.sweep import ablation_sweep

    model = lens_attn.load_model(args.model)
    probes = default_probes(model)
    heads = [(layer, h) for layer in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    rows = []
    for test in args.tests.split(","):
        kind, metric = test.split("/")
        prompts = _evenly(probes[kind], args.prompts)
        for size in map(int, args.sizes.split(",")):
            rng = random.Random(f"{args.seed}/{test}/{size}")
            sets = {tuple(sorted(rng.sample(heads, size))) for _ in range(args.sets * 3)}
            units = sorted(sets)[: args.sets]
            rng.shuffle(units)
            sweep = ablation_sweep(model, prompts, metric=metric, heads=[list(u) for u in units])
            diff = (sweep.ablated_per_prompt - sweep.baseline_per_prompt[None]).double()
            sign = lens_attn.ablation.metrics.harm_sign(metric)
            diff = sign * diff  # positive hurts
            means = diff.mean(dim=1)
            hits = {"rank": 0, "prompt": 0, "set": 0}
            for _ in range(args.repeats):
                pick = rng.sample(range(len(units)), args.n_null + 1)
                g, nulls = pick[0], pick[1:]
                null_means = [float(means[j]) for j in nulls]
                p_rank = (1 + sum(m >= float(means[g]) for m in null_means)) / (1 + len(nulls))
                p_prompt = stats.sign_flip_p(diff[g] - diff[nulls].mean(dim=0))
                p_set = stats.prediction_t_p(float(means[g]), null_means)
                hits["rank"] += p_rank <= 0.05
                hits["prompt"] += p_prompt <= 0.05
                hits["set"] += p_set <= 0.05
            rates = {k: v / args.repeats for k, v in hits.items()}
            se = math.sqrt(0.05 * 0.95 / args.repeats)
            rows.append({"test": test, "size": size, "sets": len(units), **rates, "se": se})
            print(f"{test:<32} size {size}: false positives at 0.05 rank {rates['rank']:.3f} "
                  f"prompt {rates['prompt']:.3f} set {rates['set']:.3f} (binomial se {se:.3f})")  # fmt: skip
    out = Path(args.out)
    os.makedirs(out, exist_ok=True)
    (out / "calibration.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(f"wrote {out / 'calibration.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
