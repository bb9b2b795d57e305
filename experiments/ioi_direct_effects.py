"""Which heads carry a model's IOI answer on the direct path: the measurement behind the
``name_mover`` rule and the ``copy_suppression`` test (experiments/significance.md, round 3).

    python experiments/ioi_direct_effects.py --model models/SmolLM2-135M-Instruct.Q4_1.gguf

Written with plain TransformerLens hooks (``run_with_cache``), not lens-attn's scorers: only the
model loader and discover's IOI sentences (``lens_attn.probes.ioi_probes``) come from lens-attn.
Per sentence and head, at the last position END, with ``scale`` the final norm's scale there:

- ``attn_io``: the attention END -> IO;
- ``dla``: the head's direct effect on ``logit(IO) - logit(S)``: ``z[END] W_O / scale`` through
  ``W_U[:, IO] - W_U[:, S]``;
- ``names``: its direct effect on the mean of ``logit(IO)`` and ``logit(S)`` (copy suppression
  lowers the names in context).

Prints the model's IOI accuracy and the heads ranked by each effect; ``--out`` writes them as JSON.
"""

import argparse
import json
from pathlib import Path

import torch

from lens_attn.loading import load_model
from lens_attn.probes import ioi_probes


@torch.no_grad()
def measure(model, n: int = 48) -> dict:
    """``{"accuracy", "logit_diff", "attn_io", "dla", "names"}``; the grids are ``[layer, head]``
    means over the sentences."""
    probes = ioi_probes(model, n=n)
    if not probes:
        raise SystemExit("this model's vocabulary has no two one-token names: no IOI sentences")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    grids = {k: torch.zeros(len(probes), n_layers, n_heads) for k in ("attn_io", "dla", "names")}
    diffs = []
    wanted = ("hook_z", "hook_pattern", "ln_final.hook_scale")
    for i, probe in enumerate(probes):
        tokens = probe.tokens[None]
        io, s = probe.answers
        logits, cache = model.run_with_cache(
            tokens, names_filter=lambda name: name.endswith(wanted)
        )
        end = tokens.shape[1] - 1
        diffs.append(float(logits[0, end, io] - logits[0, end, s]))
        io_pos = int((tokens[0] == io).nonzero()[0, 0])
        scale = cache["ln_final.hook_scale"][0, end]
        for layer in range(n_layers):
            z = cache[f"blocks.{layer}.attn.hook_z"][0, end]  # [head_index, d_head]
            out = torch.einsum("he,hem->hm", z, model.blocks[layer].attn.W_O) / scale
            grids["dla"][i, layer] = out @ (model.W_U[:, io] - model.W_U[:, s])
            grids["names"][i, layer] = out @ (model.W_U[:, io] + model.W_U[:, s]) / 2
            grids["attn_io"][i, layer] = cache[f"blocks.{layer}.attn.hook_pattern"][
                0, :, end, io_pos
            ]
    diffs = torch.tensor(diffs)
    return {"accuracy": float((diffs > 0).float().mean()), "logit_diff": float(diffs.mean()),
            **{k: v.mean(0) for k, v in grids.items()}}  # fmt: skip


def _ranked(grid: torch.Tensor, attn: torch.Tensor, k: int, descending: bool) -> list[tuple]:
    n_heads = grid.shape[1]
    order = grid.flatten().argsort(descending=descending)[:k]
    return [(f"L{int(j) // n_heads}H{int(j) % n_heads}", round(float(grid.flatten()[j]), 3),
             round(float(attn.flatten()[j]), 3)) for j in order]  # fmt: skip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a model lens_attn.load_model can open")
    parser.add_argument("--n", type=int, default=48, help="IOI sentences (default: %(default)s)")
    parser.add_argument("--top", type=int, default=8, help="heads listed per ranking")
    parser.add_argument("--out", type=Path, default=None, help="write the rankings as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = measure(load_model(args.model), n=args.n)
    report = {
        "accuracy": result["accuracy"],
        "logit_diff": result["logit_diff"],
        "largest_dla (head, logits, attn END->IO)": _ranked(
            result["dla"], result["attn_io"], args.top, True
        ),  # fmt: skip
        "most_negative_dla": _ranked(result["dla"], result["attn_io"], args.top, False),
        "most_negative_names": _ranked(result["names"], result["attn_io"], args.top, False),
        "median_head_names": float(result["names"].median()),
    }
    print(json.dumps(report, indent=1))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
