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
    """Does the model do IOI (logit difference IO - S, accuracy on ``ioi_probes``)? If it does, the
    IOI circuit role by role (Wang et al. 2022): name movers (the strongest direct effects on the
    logit difference), the heads feeding their queries (S-inhibition in Wang et al.), the heads
    feeding those (duplicate-token and induction heads), each with its attention scores on the IOI
    sentences, and the faithfulness of all of them together."""
    import torch

    from lens_attn import circuit, score_heads
    from lens_attn.ablation.metrics import logit_diff
    from lens_attn.circuits.faithfulness import faithfulness
    from lens_attn.probes import ioi_probes

    probes = ioi_probes(model)
    diffs = []
    for p in probes:
        with torch.no_grad():
            logits = model(p.tokens[None])
        diffs.append(
            float(logit_diff(logits, p.tokens[None], answer_tokens=torch.tensor([p.answers]))[0])
        )
    d = torch.tensor(diffs)
    out = {"n": len(d), "logit_diff_mean": float(d.mean()),
           "logit_diff_stderr": float(d.std() / len(d) ** 0.5), "accuracy": float((d > 0).float().mean())}  # fmt: skip
    if out["accuracy"] < 0.7:
        out["does_ioi"] = False
        return out
    out["does_ioi"] = True
    grids = score_heads(model, probes, scores=["duplicate_token", "induction"], progress=False)

    def scores_of(name):
        from lens_attn.heads import read_head

        h = read_head(name)
        return {s: round(float(grids[s][h]), 3) for s in ("duplicate_token", "induction")}

    def top_senders(result, kinds, k):
        best: dict[str, float] = {}
        for e in result.circuit_edges():
            if e.input in kinds:
                best[e.sender] = max(best.get(e.sender, 0.0), e.fraction)
        return sorted(best, key=lambda s: -best[s])[:k]

    direct = circuit(model, [], task="ioi", probes=probes, top_logits=12, faithfulness=False)
    movers = [e.sender for e in sorted(direct.measured(), key=lambda e: -e.effect)[:3]]
    to_movers = circuit(
        model, movers, task="ioi", score="io", probes=probes, top_k=30, faithfulness=False
    )
    inhibition = top_senders(to_movers, ("q",), 3)
    to_inhibition = circuit(model, inhibition, task="ioi", score="s2", probes=probes, top_k=30,
                            faithfulness=False) if inhibition else None  # fmt: skip
    measured_up = sorted((e for e in to_inhibition.measured()
                          if e.input != "logits" and e.effect > 2 * e.stderr),
                         key=lambda e: -e.effect)[:10] if to_inhibition else []  # fmt: skip
    upstream = list(dict.fromkeys(e.sender for e in measured_up))
    from lens_attn.heads import read_head

    nodes = sorted({read_head(h) for h in movers + inhibition + upstream})
    faith = faithfulness(model, probes, nodes, task="ioi")
    out["roles"] = {
        "name_movers": [
            {
                "head": e.sender,
                "direct_effect": e.effect,
                "stderr": e.stderr,
                "io_attention": to_movers.receivers[e.sender]["clean"],
            }
            for e in sorted(direct.measured(), key=lambda e: -e.effect)[:3]
        ],  # fmt: skip
        "into_name_movers_q": [vars(e) for e in to_movers.circuit_edges() if e.input == "q"][:8],
        "s_inhibition_candidates": [
            {"head": h, "s2_attention": to_inhibition.receivers[h]["clean"]} for h in inhibition
        ]
        if to_inhibition
        else [],  # fmt: skip
        "into_s_inhibition": [{**vars(e), **scores_of(e.sender)} for e in measured_up],
        "upstream": [{"head": h, **scores_of(h)} for h in upstream],
    }
    out["faithfulness"] = vars(faith)
    return out


if __name__ == "__main__":
    main()
