"""Benchmark streaming head scoring: speed against a plain forward pass and against TransformerLens's
``detect_head``, and peak memory against depth. Ratios are measured side by side in one run, on one
torch thread (``torch.set_num_threads(1)``), best of ``--repeats`` interleaved runs (and more, up to
100, until the rounds of a comparison took ``--min-seconds``: a fast comparison gets enough rounds
for its minimum to find a quiet moment of a shared machine).

    python experiments/bench_scores.py          # -> experiments/results/bench_scores.json
    python experiments/bench_scores.py --model models/SmolLM2-135M-Instruct.Q4_1.gguf --repeats 3
    python experiments/bench_scores.py --only-a --scores pattern all issue24 --cpu-time

(a) score sets vs a plain forward pass with logits over the same batches, every set and the forward
    in the same interleaved rounds, on 16 prompts of 81 tokens (repeated random tokens, period 40)
    and on the full default probes (``builtin_probes``). ``--scores``: ``pattern`` (default) every
    built-in that reads the forward's activations; ``all`` (default) every built-in, the
    weight-only ``copying``, ``ov_rank`` and ``successor`` included; ``issue24`` the 11 scores
    issue 24 measured. The weight-only scores read no activations and cost the same on every
    call whatever the prompts: their seconds are timed on their own and printed beside. Targets:
    <= 1.3x on the bundled checkpoint, <= 1.15x on SmolLM2-135M. Without ``--model``: the bundled
    checkpoint and a wider random-init Llama-shaped model (d_model 1024); with ``--model DIR``:
    that model only (and no (b)/(c));
(b) ``score_heads`` for previous-token, duplicate-token and induction vs ``detect_head`` computing the
    same three head types over the same 32 prompts (target >= 10x faster);
(c) peak extra memory of scoring an 8-layer model vs a 1-layer model of the same layer shape
    (target <= 1.5x), next to ``run_with_cache`` of every pattern for scale.
"""

import argparse
import time
from pathlib import Path

import torch
from benchmarking import (
    best_times,
    interleaved_times,
    llama_shaped,
    scoring_peak_memory_in_subprocess,
)
from transformer_lens.head_detector import detect_head

import lens_attn
from lens_attn.compat import HookedTransformer
from lens_attn.files import dumps_strict, write_text_atomic
from lens_attn.probes import builtin_probes, pad
from lens_attn.scoring.builtin import BUILTIN_SCORES

RESULTS = Path(__file__).resolve().parent / "results"


def wide_model(tokenizer, *, n_layers: int = 4, d_model: int = 1024) -> HookedTransformer:
    """Random-init Llama-shaped model: GQA 16/4 heads of 64, SwiGLU 2816, the bundled tokenizer."""
    return llama_shaped(
        n_layers,
        d_model=d_model,
        n_heads=d_model // 64,
        n_key_value_heads=d_model // 256,
        d_mlp=int(2.75 * d_model),
        n_ctx=128,
        tokenizer=tokenizer,
    )


# the built-in scores when issue 24 measured 1.25x (SmolLM2) on the bridge; issue 26 added
# previous_n, name_mover, retrieval and the weight-only ov_rank and successor
ISSUE_24_SCORES = ["previous_token", "current_token", "duplicate_token", "induction", "bos",
                   "entropy", "confidence", "mean_distance", "sparsity", "offset", "copying"]  # fmt: skip


def score_sets() -> dict[str, list[str]]:
    """``--scores``' choices: ``pattern`` every built-in that reads the forward's activations,
    ``all`` every built-in, ``issue24`` the 11 scores issue 24 measured (``copying`` included)."""
    from lens_attn.scoring.registry import registered

    table = registered()
    return {
        "pattern": [n for n in BUILTIN_SCORES if table[n].hooks],
        "all": list(BUILTIN_SCORES),
        "issue24": ISSUE_24_SCORES,
    }


def weight_only_seconds(model, repeats: int, *, clock=time.perf_counter) -> dict[str, float]:
    """Best seconds of each weight-only built-in (``from_weights``: no prompts, no forward; the
    same cost on every ``score_heads`` call that asks for it), and their total."""
    from lens_attn.scoring.registry import registered

    table = registered()
    fns = {
        n: (lambda a=table[n]: a.from_weights(model)) for n in BUILTIN_SCORES if not table[n].hooks
    }
    out = best_times(fns, repeats=repeats, clock=clock)
    out["total"] = sum(out.values())
    return out


def forward_vs_scores(
    model,
    batch_size: int,
    repeats: int,
    min_seconds: float,
    sets: dict[str, list[str]],
    *,
    clock=time.perf_counter,
) -> dict:
    """Each score set in ``sets`` (label -> names) / a plain forward with logits, on 16 81-token
    prompts and on the default probes; every set and the forward in the same interleaved rounds."""
    out = {}
    probe_sets = {
        "16x81": lens_attn.induction_probes(model, periods=(40,), n_per_period=16, seed=0),
        "builtin_probes": builtin_probes(model),
    }
    for label, probes in probe_sets.items():
        order = sorted(probes, key=lambda p: len(p.tokens))  # the same batches score_heads makes
        batches = [pad(order[i : i + batch_size])[0] for i in range(0, len(order), batch_size)]

        @torch.no_grad()
        def forward(batches=batches):
            for tokens in batches:
                model(tokens.to(model.cfg.device))  # logits included

        def scores(names, probes=probes):
            lens_attn.score_heads(model, probes, scores=names, batch_size=batch_size,
                                  progress=False)  # fmt: skip

        fns = {"forward": forward}
        fns.update({name: (lambda n=names: scores(n)) for name, names in sets.items()})
        t = best_times(fns, repeats=repeats, min_seconds=min_seconds, clock=clock)
        out[label] = {
            "forward_s": t["forward"],
            "n_prompts": len(probes),
            "sets": {
                name: {"scores": names, "scores_s": t[name], "ratio": t[name] / t["forward"]}
                for name, names in sets.items()
            },
        }
    return out


def versus_detect_head(model, repeats: int) -> dict:
    fits = [
        p
        for p in lens_attn.probes.natural_prompts()
        if model.to_tokens(p).shape[1] < model.cfg.n_ctx
    ]
    prompts = (fits * 2)[:32]  # detect_head refuses prompts that fill the whole context
    names = {
        "previous_token": "previous_token_head",
        "duplicate_token": "duplicate_token_head",
        "induction": "induction_head",
    }

    def ours():
        lens_attn.score_heads(model, prompts, scores=list(names), batch_size=32, progress=False)

    def theirs():
        for tl_name in names.values():
            detect_head(model, prompts, tl_name, error_measure="mul")

    t = interleaved_times({"lens_attn": ours, "detect_head": theirs}, repeats=repeats)
    return {
        "lens_attn_s": t["lens_attn"],
        "detect_head_s": t["detect_head"],
        "speedup": t["detect_head"] / t["lens_attn"],
    }


def memory_vs_depth() -> dict:
    # each configuration in a fresh process: peak RSS is only meaningful there
    out = {
        f"{mode}_{n}_layers_bytes": scoring_peak_memory_in_subprocess(n, mode=mode)
        for n in (1, 8)
        for mode in ("scores", "cache")
    }
    out["ratio_8_vs_1"] = out["scores_8_layers_bytes"] / out["scores_1_layers_bytes"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="default: experiments/results/bench_scores[_<model>].json")  # fmt: skip
    parser.add_argument("--model", type=Path, default=None,
                        help="a local model (HF directory, .gguf file, ...): load_model's source")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=20.0,
                        help="(a): keep adding rounds (up to 100) until they took this long")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--scores", nargs="+", choices=("pattern", "all", "issue24"),
                        default=["pattern", "all"],
                        help="(a): the score sets to time, in the same rounds: every built-in that "
                        "reads the forward (pattern), every built-in (all), issue 24's 11")  # fmt: skip
    parser.add_argument("--only-a", action="store_true",
                        help="without --model: (a) on the bundled checkpoint only")  # fmt: skip
    parser.add_argument("--cpu-time", action="store_true",
                        help="(a): time by this process's CPU time, not wall time (a loaded machine)")  # fmt: skip
    args = parser.parse_args()
    sets = {name: score_sets()[name] for name in args.scores}
    clock = time.process_time if args.cpu_time else time.perf_counter
    torch.set_num_threads(1)

    from lens_attn.compat import DEFAULT_BACKEND, TL_VERSION

    installed = f"TransformerLens {'.'.join(map(str, TL_VERSION))}"
    print(f"{installed}; load_model's backend: {DEFAULT_BACKEND}")
    results: dict = {
        "transformer_lens": installed,
        "backend": DEFAULT_BACKEND,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "min_seconds": args.min_seconds,
        "clock": "process CPU time" if args.cpu_time else "wall",
    }
    if args.model is not None:
        model = lens_attn.load_model(args.model, device="cpu")
        results["a_" + args.model.name] = forward_vs_scores(
            model, args.batch_size, args.repeats, args.min_seconds, sets, clock=clock
        )
        results["weight_only_s_" + args.model.name] = weight_only_seconds(
            model, args.repeats, clock=clock
        )
    else:
        bundled = lens_attn.load_model(device="cpu")
        results["a_bundled"] = forward_vs_scores(
            bundled, args.batch_size, args.repeats, args.min_seconds, sets, clock=clock
        )
        results["weight_only_s_bundled"] = weight_only_seconds(bundled, args.repeats, clock=clock)
    if args.model is None and not args.only_a:
        results["a_wide_d1024"] = forward_vs_scores(
            wide_model(bundled.tokenizer),
            args.batch_size,
            args.repeats,
            args.min_seconds,
            sets,
            clock=clock,
        )
        results["b_vs_detect_head"] = versus_detect_head(bundled, args.repeats)
        results["c_memory"] = memory_vs_depth()
    for key, runs in results.items():
        if key.startswith("a_"):
            for label, run in runs.items():
                for name, r in run["sets"].items():
                    print(
                        f"(a) {name} ({len(r['scores'])} scores) / plain forward with logits, "
                        f"{key[2:]}, {label} ({run['n_prompts']} prompts): {r['ratio']:.2f}x "
                        f"({r['scores_s']:.2f} s / {run['forward_s']:.2f} s)"
                    )
        if key.startswith("weight_only_s_"):
            parts = ", ".join(f"{n} {v:.2f} s" for n, v in runs.items() if n != "total")
            print(f"(a) weight-only scores, {key[14:]}: {runs['total']:.2f} s ({parts})")
    if "b_vs_detect_head" in results:
        print(
            "(b) detect_head / score_heads, 3 head types x 32 prompts: "
            f"{results['b_vs_detect_head']['speedup']:.1f}x faster"
        )
        c, mib = results["c_memory"], 2**20
        print(
            f"(c) peak extra memory, 8 layers / 1 layer: {c['ratio_8_vs_1']:.2f}x "
            f"({c['scores_8_layers_bytes'] / mib:.0f} vs {c['scores_1_layers_bytes'] / mib:.0f} MiB; "
            f"run_with_cache of 8 layers' patterns: {c['cache_8_layers_bytes'] / mib:.0f} MiB)"
        )
    suffix = "" if args.scores == ["pattern", "all"] else "_" + "_".join(args.scores)
    out = args.out or RESULTS / (
        f"bench_scores{suffix}.json"
        if args.model is None
        else f"bench_scores_{args.model.stem}{suffix}.json"
    )
    write_text_atomic(out, dumps_strict(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
