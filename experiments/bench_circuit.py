"""The full circuit run on SmolLM2-135M: time, passes, screen-vs-exact Spearman, faithfulness.

    python experiments/bench_circuit.py --out experiments/results/bench_circuit.json
    python experiments/bench_circuit.py --backend bridge --out /tmp/bench_circuit_bridge.json

One thread (``OMP_NUM_THREADS=1``; ``torch.set_num_threads(1)`` here too). Runs
``lens_attn.circuit(model)`` with its defaults (receivers: every head scoring >= 0.4 on induction
over 32 induction probes, periods 23 and 41; the 40 head-to-head edges and 10 direct edges the
screen ranks highest measured exactly by path patching; faithfulness), and reports:

- wall time per stage (screen, path patching, faithfulness), and in all, wall and CPU time (the
  process's CPU seconds: on a shared machine, the wall time grows with the other processes' load);
- passes: the screen's forward passes and single-head backwards, the exact step's single-head
  recomputes; against what the same graph costs TransformerLens-style path patching (two forward
  passes per edge per batch: a cut run with everything between sender and receiver frozen, then a
  patched run; ``tests/test_circuit.py::reference_path_patch``) and ACDC (one forward pass per edge
  per batch for one sweep over the edges at one threshold, Conmy et al. 2023);
- Spearman between the screen and path patching over the measured edges, in all and per input;
- faithfulness of the circuit's heads (everything else mean-ablated) on -induction_loss;
- with ``--ioi``: whether SmolLM2 does IOI (logit difference IO - S and accuracy on
  ``ioi_probes``), and if it does, the IOI circuit (receivers: the top duplicate-token and
  induction heads; direct edges: the name movers).

Prints the summary and writes every number as JSON to ``--out``.
"""

import argparse
import json
import time
from pathlib import Path

DEFAULT_MODEL = Path.home() / ".cache" / "lens-attn" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="default: %(default)s")
    parser.add_argument("--backend", choices=("hooked", "bridge"), default=None)
    parser.add_argument("--steps", type=int, default=0, help="screen IG steps (default 0: EAP)")
    parser.add_argument("--ioi", action="store_true", help="also measure IOI (see docstring)")
    parser.add_argument("--out", type=Path, required=True, help="results JSON")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from lens_attn import circuit, load_model
    from lens_attn.compat import TL_VERSION
    from lens_attn.files import dumps_strict, write_text_atomic

    start = time.perf_counter()
    model = load_model(args.model, device="cpu", backend=args.backend)
    load_s = time.perf_counter() - start
    start, cpu = time.perf_counter(), time.process_time()
    result = circuit(model, steps=args.steps, progress=True)
    total_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu
    df = result.to_dataframe()
    measured = df[df.method == "path_patching"]
    per_input = {
        kind: {
            "n": int(len(rows)),
            "spearman": float(rows.screen.corr(rows.effect, method="spearman"))
            if len(rows) > 2
            else None,
        }
        for kind, rows in measured.groupby("input")
    }
    p = result.passes
    edges = p["edges_screened"]
    out = {
        "model": args.model,
        "backend": type(model).__name__,
        "transformer_lens": ".".join(map(str, TL_VERSION)),
        "load_s": load_s,
        "circuit_s": total_s,
        "circuit_cpu_s": cpu_s,
        "stages_s": {k: v for k, v in result.settings.items() if k.endswith("_s")},
        "receivers": result.receivers,
        "passes": p,
        "comparison_passes": {
            "lens_attn_full_forward": p["screen_forward_passes"]
            + p["exact_forward_passes"]
            + p.get("faithfulness_forward_passes", 0),
            "tl_path_patching_measured_edges": 2 * p["batches"] * p["edges_measured"],
            "tl_path_patching_all_edges": 2 * p["batches"] * edges,
            "acdc_one_sweep_all_edges": p["batches"] * edges,
        },
        "spearman": result.spearman,
        "spearman_per_input": per_input,
        "faithfulness": None if result.faithfulness is None else vars(result.faithfulness),
        "top_edges": measured.head(20).to_dict(orient="records"),
    }
    print(result.summary(k=20))
    if args.ioi:
        out["ioi"] = ioi(model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, dumps_strict(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("circuit_s", "circuit_cpu_s", "stages_s", "comparison_passes",
                                          "spearman", "spearman_per_input")}, indent=1))  # fmt: skip
    print(f"wrote {args.out}")
    return out


def ioi(model) -> dict:
    """Does the model do IOI? Clean logit difference and accuracy on ``ioi_probes``."""
    import torch

    from lens_attn.ablation.metrics import logit_diff
    from lens_attn.probes import ioi_probes

    probes = ioi_probes(model)
    diffs = []
    for p in probes:
        tokens = p.tokens[None]
        with torch.no_grad():
            logits = model(tokens)
        diffs.append(float(logit_diff(logits, tokens, answer_tokens=torch.tensor([p.answers]))[0]))
    diffs_t = torch.tensor(diffs)
    return {
        "n": len(diffs),
        "logit_diff_mean": float(diffs_t.mean()),
        "logit_diff_stderr": float(diffs_t.std() / len(diffs) ** 0.5),
        "accuracy": float((diffs_t > 0).float().mean()),
    }


if __name__ == "__main__":
    main()
