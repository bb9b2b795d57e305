"""How far a bfloat16 model's head scores are from float32's, and why: SmolLM2-135M by default.

    python experiments/bench_half_precision.py --out experiments/results/half_precision_smollm2.json
    python experiments/bench_half_precision.py --model lens_attn/data/tiny-llama-2 --out /tmp/hp.json

Three models of one checkpoint, scored on the same built-in probes: ``f32``; ``rounded``, float32
arithmetic on the bfloat16 model's (folded, rounded) weights; and ``bf16``. Per score it reports the
largest difference over heads of ``rounded - f32`` (rounding the weights), ``bf16 - rounded``
(bfloat16 arithmetic in the forward pass) and ``bf16 - f32``, and the reduction's own error: the
bfloat16 model's patterns on one batch scored as they are, against the reference formulas of
``tests/score_references.py`` on the same patterns in float64 (``score_heads`` with ``cache=``). Then which heads change label, and how close their scores are to the threshold.
``tests/test_half_precision.py`` checks the same on tiny models.
"""

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the SmolLM2-135M GGUF of the tests")
    parser.add_argument("--per-kind", type=int, default=16, help="probes of each kind")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import torch
    from transformer_lens.utilities import get_act_name

    from lens_attn.loading import load_model
    from lens_attn.probes import builtin_probes, group_by_kind
    from lens_attn.scoring.builtin import BUILTIN_SCORES
    from lens_attn.scoring.runner import score_heads

    torch.set_num_threads(1)
    source = args.model
    if source is None:
        sys.path.insert(0, str(REPO / "tests"))
        import real_model

        source = str(real_model.smollm2_gguf())
    start = time.perf_counter()
    f32 = load_model(source, device="cpu", progress=False)
    bf16 = load_model(source, device="cpu", dtype="bfloat16", progress=False)
    rounded = load_model(source, device="cpu", progress=False)
    weights = dict(bf16.named_parameters())
    with torch.no_grad():
        for name, param in rounded.named_parameters():
            param.copy_(weights[name].float())
    sets = group_by_kind(builtin_probes(f32))
    probes = [p for kind in ("natural", "repeated_random", "repeated_tokens")
              for p in sets[kind][: args.per_kind]]  # fmt: skip
    grids, seconds = {}, {}
    for name, model in (("f32", f32), ("rounded", rounded), ("bf16", bf16)):
        t = time.perf_counter()
        grids[name] = score_heads(model, probes, scores=BUILTIN_SCORES, progress=False)
        seconds[name] = time.perf_counter() - t
        print(f"scored {name} in {seconds[name]:.1f} s", flush=True)

    def gap(a, b, score):
        return float((grids[a].values[score] - grids[b].values[score]).abs().nan_to_num().max())

    per_score = {
        score: {
            "weights": gap("rounded", "f32", score),
            "arithmetic": gap("bf16", "rounded", score),
            "total": gap("bf16", "f32", score),
        }  # fmt: skip
        for score in grids["f32"].values
    }

    # the reduction alone: one batch of equal-length probes, its bf16 patterns scored twice
    batch = [p for p in probes if len(p.tokens) == len(probes[-1].tokens)][:8]
    tokens = torch.stack([p.tokens for p in batch])
    names = [get_act_name("pattern", layer) for layer in range(bf16.cfg.n_layers)]
    with torch.no_grad():
        _, cache = bf16.run_with_cache(tokens, names_filter=names)
    sys.path.insert(0, str(REPO / "tests"))
    from score_references import reference_analyses  # the one-score-at-a-time formulas

    references = [a for a in reference_analyses() if a.hooks and a.name != "ref_offset"]
    plain = [a.name.removeprefix("ref_") for a in references]
    as_is = score_heads(bf16, batch, scores=plain, progress=False,
                        cache={n: cache[n] for n in names})  # fmt: skip
    exact = score_heads(bf16, batch, scores=references, progress=False,
                        cache={n: cache[n].double() for n in names})  # fmt: skip
    reduction = {
        s: float((as_is.values[s] - exact.values[f"ref_{s}"]).abs().nan_to_num().max())
        for s in plain
    }

    labels32, labels16 = grids["f32"].classify(), grids["bf16"].classify()
    changed = []
    for head, labs in labels32.labels.items():
        for label in sorted(set(labs) ^ set(labels16.labels[head])):
            score32 = float(grids["f32"].label_score(label)[head])
            score16 = float(grids["bf16"].label_score(label)[head])
            changed.append({"head": f"L{head[0]}H{head[1]}", "label": label,
                            "threshold": labels32.thresholds[label],
                            "f32": score32, "bf16": score16})  # fmt: skip
    labelled = sum(1 for labs in labels32.labels.values() if labs)
    result = {
        "source": source,
        "probes": len(probes),
        "score_seconds": seconds,
        "max_abs_diff": per_score,
        "reduction_max_abs_diff": reduction,
        "labelled_heads_f32": labelled,
        "label_changes": changed,
        "total_s": time.perf_counter() - start,
    }
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
