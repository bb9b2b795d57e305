"""Which SmolLM2 heads' top atlas examples sit on the second copy of a planted repeated span.

    PYTHONPATH=. OMP_NUM_THREADS=1 python experiments/atlas_induction.py [--k 10]

Prints, for the heads with the highest corpus induction share, that share, the share of the head's
top-k examples on second copies, and its ``induction`` score on repeated random tokens
(``score_heads``), on the planted corpus of ``tests/test_atlas.py``.
"""

import argparse
import sys
from pathlib import Path

import torch

import lens_attn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> None:
    import real_model
    from test_atlas import planted_corpus, second_copy_share

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = lens_attn.load_model(real_model.smollm2_gguf(), device="cpu")
    texts = planted_corpus()
    head_atlas = lens_attn.atlas(model, texts, k=args.k, circuits=False, pca=False, probes=False,
                                 progress=False)  # fmt: skip
    scores = lens_attn.score_heads(model, lens_attn.induction_probes(model, n_per_period=4),
                                   scores=["induction"], progress=False)  # fmt: skip
    table = head_atlas.to_dataframe()
    table["second_copy_top"] = [second_copy_share(model, head_atlas, texts, n, args.k)
                                for n in table["name"]]  # fmt: skip
    table["induction_score"] = [float(scores["induction"][r.layer, r.head])
                                for r in table.itertuples()]  # fmt: skip
    columns = ["name", "induction", "second_copy_top", "induction_score", "top_activation"]
    print(table.sort_values("induction_score", ascending=False)[columns].head(args.top)
          .to_string(index=False, float_format="%.3f"))  # fmt: skip
    early = table[table.layer < 6]["second_copy_top"].mean()
    print(
        f"layers 0-5: mean share of top examples on second copies {early:.3f}; all heads "
        f"{table['second_copy_top'].mean():.3f}"
    )


if __name__ == "__main__":
    main()
