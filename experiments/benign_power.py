"""How many prompts attention_sink's equivalence test (TOST) needs: confirm that label alone.

    python experiments/benign_power.py --run runs/smol \
        --model ~/.cache/lens-attn/SmolLM2-135M-Instruct.Q4_1.gguf --prompts 8,16 --out runs/benign_power

Reads the labels of a ``lens-attn discover`` run folder (``labels.csv``), then for each count in
``--prompts`` runs ``confirm`` on the ``attention_sink`` heads alone on that many natural probes
(every head with its own test where its layer's group is not benign: no ``max_heads`` cap), and
prints how many heads the TOST confirms. The p-values are corrected (Benjamini-Hochberg) across
this label's rows only, so they read a little stronger than in a whole run, where the other
labels' small p-values also lower the threshold; the raw ``p <= 0.05`` count is printed too.
Writes ``benign_power.json`` into ``--out``.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a discover run folder (labels.csv)")
    parser.add_argument("--model", default=None, help="the run's model (default: bundled)")
    parser.add_argument("--prompts", default="8,16")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    import pandas as pd

    import lens_attn
    from lens_attn.ablation.budget import evenly as _evenly
    from lens_attn.ablation.confirm import confirm, default_probes

    model = lens_attn.load_model(args.model)
    table = pd.read_csv(Path(args.run) / "labels.csv").fillna("")
    labels = {(int(r.layer), int(r.head)): ("attention_sink",) for r in table.itertuples()
              if "attention_sink" in str(r.labels).split(";")}  # fmt: skip
    natural = default_probes(model)["natural"]
    rows = []
    for n in map(int, args.prompts.split(",")):
        start = time.perf_counter()
        result = confirm(model, labels=labels, probes={"natural": _evenly(natural, n)})
        seconds = time.perf_counter() - start
        tests = result.tests
        row = {"prompts": n, "heads": len(tests), "confirmed": sum(t.confirmed for t in tests),
               "raw_p_le_0.05": sum(t.p <= 0.05 for t in tests), "seconds": seconds}  # fmt: skip
        rows.append(row)
        print(f"{n} prompts: {row['confirmed']}/{row['heads']} attention_sink heads confirmed "
              f"(p_adjusted < 0.05), {row['raw_p_le_0.05']} with raw p <= 0.05 ({seconds:.0f}s)")  # fmt: skip
    out = Path(args.out)
    os.makedirs(out, exist_ok=True)
    (out / "benign_power.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(f"wrote {out / 'benign_power.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
