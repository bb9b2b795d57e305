"""Precision and recall of ``lens-attn discover``'s labels against an independent measurement.

    python experiments/label_accuracy.py --model models/SmolLM2-135M-Instruct.Q4_1.gguf --run runs/smollm2
    python experiments/label_accuracy.py --run runs/demo          # the bundled model

The independent scores never touch lens-attn's scorers, probes or TransformerLens: the model is
loaded as transformers' ``LlamaForCausalLM`` with eager attention, its probes are generated here
(random ids drawn above the tokenizer's special ids), and each score is the mean attention weight
on its target, from ``output_attentions=True``:

- induction: repeated random tokens ``[BOS, r, r]`` (periods 23, 41), second-copy queries, key
  ``q - period + 1``;
- previous_token / current_token / attention_sink: the shipped natural prompts (tokenized by the
  HF tokenizer), key ``q - 1`` / ``q`` / ``0`` for queries ``q >= 1``;
- duplicate_token: random tokens from a pool of 20, queries with an earlier copy, summed weight on
  the earlier copies; 64 sequences (a new pool each), since SmolLM2's heads sit close to the 0.4
  threshold (L9H2 0.405-0.433, L8H0 0.365-0.435 over four draws of 16) and one draw of 16 moved
  two of them across it.

The labels of issue #26 are checked against ``tests/head_type_references.py`` (transformers only,
the formulas written from the papers, their own seeded probes):

- copying / copy_suppression: the share of 400 random tokens whose own logit is in the top / bottom
  10 of the head's OV row on the effective embedding, exact over the whole vocabulary (SmolLM2:
  about 8 minutes on one loaded thread; ``--reuse`` takes the grids of an earlier run's
  ``head_type_reference.pt``);
- successor: Gould et al.'s succession score on the tokenizer's ordinal sequences;
- previous_n: attention at offsets 2..8 on the natural prompts, rows pooled, the best offset;
- name_mover / negative_name_mover: on 48 IOI sentences of its own (3 of Wang et al.'s templates,
  names drawn with another seed), with the model's IOI accuracy;
- retrieval: on 8 needle-in-a-haystack probes of its own, with the model's retrieval accuracy.

A head is a positive when its independent score reaches the label's default threshold; the script
prints each label's precision and recall, the induction and previous-token targets of issue #14,
and the fraction of each label's heads confirmed by all its tests (``ablation.csv``), and writes
``label_accuracy.json`` into the run folder, and with ``--table`` appends the labels' markdown
table rows (model, label, labelled, positives, precision, recall, heads) to a file.
"""

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import torch

DATA = Path(__file__).resolve().parents[1] / "lens_attn" / "data"
THRESHOLDS = {"previous_token": 0.4, "induction": 0.4, "duplicate_token": 0.4,
              "current_token": 0.4, "attention_sink": 0.6}  # fmt: skip


def _specials(tok) -> int:
    ids = [i for i in tok.all_special_ids if i < 1000] + [0, 1, 2]
    return max(ids) + 1


@torch.no_grad()
def _attn(model, tokens: torch.Tensor) -> torch.Tensor:
    """``[layer, head, q, k]`` attention of one sequence."""
    out = model(tokens[None], output_attentions=True)
    return torch.stack([a[0].float() for a in out.attentions])


@torch.no_grad()
def independent_scores(model, tok, *, seed: int = 0) -> dict[str, torch.Tensor]:
    cfg = model.config
    n_layers, n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
    bos = tok.bos_token_id if tok.bos_token_id is not None else 1
    low, high = _specials(tok), cfg.vocab_size
    g = torch.Generator().manual_seed(1000 + seed)
    sums = {k: torch.zeros(n_layers, n_heads) for k in THRESHOLDS}
    counts = dict.fromkeys(THRESHOLDS, 0)
    for period in (23, 41):
        for _ in range(16):
            r = torch.randint(low, high, (period,), generator=g)
            a = _attn(model, torch.cat([torch.tensor([bos]), r, r]))
            q = torch.arange(period + 1, 2 * period + 1)
            sums["induction"] += a[:, :, q, q - period + 1].mean(-1)
            counts["induction"] += 1
    for _ in range(64):
        pool = low + torch.randperm(high - low, generator=g)[:20]
        body = pool[torch.randint(0, 20, (47,), generator=g)]
        t = torch.cat([torch.tensor([bos]), body])
        a = _attn(model, t)
        same = (t[:, None] == t[None, :]) & torch.ones(48, 48, dtype=torch.bool).tril(-1)
        rows = same.any(1)
        sums["duplicate_token"] += (a * same).sum(-1)[:, :, rows].mean(-1)
        counts["duplicate_token"] += 1
    prompts = json.loads((DATA / "natural_prompts.json").read_text())["prompts"]
    for text in prompts:
        ids = tok(text, add_special_tokens=False)["input_ids"][: cfg.max_position_embeddings - 1]
        t = torch.tensor([bos] + ids)
        a = _attn(model, t)
        q = torch.arange(1, len(t))
        sums["previous_token"] += a[:, :, q, q - 1].mean(-1)
        sums["current_token"] += a[:, :, q, q].mean(-1)
        sums["attention_sink"] += a[:, :, q, 0].mean(-1)
        for k in ("previous_token", "current_token", "attention_sink"):
            counts[k] += 1
    return {k: sums[k] / counts[k] for k in sums}


def head_type_truths(model, tok, reuse: Path | None, out: Path) -> tuple[dict, dict]:
    """The independent grids of issue #26's labels (``tests/head_type_references.py``), and the
    model's task accuracies; saved to ``out`` (``reuse``: copying/copy_suppression from there)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import head_type_references as ref

    grids: dict[str, torch.Tensor] = {}
    if reuse is not None and reuse.is_file():
        saved = torch.load(reuse)
        grids["copying"], grids["copy_suppression"] = saved["copy"], saved["suppress"]
    else:
        shares = ref.ov_rank_shares(model, ref.random_tokens(model, tok, 400, seed=1))
        grids["copying"], grids["copy_suppression"] = shares["copy"], shares["suppress"]
    grids["successor"] = ref.successor_scores(model, tok)
    bos = tok.bos_token_id if tok.bos_token_id is not None else 1
    prompts = json.loads((DATA / "natural_prompts.json").read_text())["prompts"]
    limit = model.config.max_position_embeddings - 1
    texts = [torch.tensor([bos] + tok(t, add_special_tokens=False)["input_ids"][:limit])
             for t in prompts]  # fmt: skip
    grids["previous_n"] = ref.offset_attention(model, texts).max(0).values
    accuracy = {}
    ioi = ref.ioi_prompts(tok)
    if ioi:
        movers = ref.name_mover_scores(model, ioi)
        grids["name_mover"] = movers["name_mover"]
        grids["negative_name_mover"] = movers["negative_name_mover"]
        accuracy["ioi"] = movers["accuracy"]
    needles = ref.retrieval_scores(model, ref.needle_probes(model, tok))
    grids["retrieval"], accuracy["retrieval"] = needles["retrieval"], needles["accuracy"]
    torch.save({"copy": grids["copying"], "suppress": grids["copy_suppression"], **grids}, out)
    return grids, accuracy


def head_type_rows(name: str, labels, grids: dict, thresholds: dict) -> list[dict]:
    """One row per label of issue #26: precision and recall of lens-attn's labels."""
    rows = []
    n_layers, n_heads = next(iter(grids.values())).shape
    for label, truth in grids.items():
        got = {(int(r.layer), int(r.head)) for r in labels.itertuples()
               if label in r.labels.split(";")}  # fmt: skip
        positives = {tuple(h) for h in torch.nonzero(truth >= thresholds[label]).tolist()}
        hit = got & positives
        rows.append({
            "model": name, "label": label, "threshold": thresholds[label],
            "labelled": len(got), "positives": len(positives),
            "precision": len(hit) / len(got) if got else None,
            "recall": len(hit) / len(positives) if positives else None,
            "heads": ", ".join(f"L{a}H{b}" for a, b in sorted(got)) or "(none)",
            "reference_max": round(float(truth.nan_to_num(-1).max()), 3),
        })  # fmt: skip
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows as markdown table lines (no header)."""

    def cell(v):
        return "n/a" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

    keys = ("model", "label", "threshold", "labelled", "positives", "precision", "recall",
            "reference_max", "heads")  # fmt: skip
    return "\n".join("| " + " | ".join(cell(r[k]) for k in keys) + " |" for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DATA / "tiny-llama-2"),
                        help="HF directory, or a .gguf file (dequantized by transformers itself)")  # fmt: skip
    parser.add_argument("--run", type=Path, required=True, help="a lens-attn discover run folder")
    parser.add_argument("--reuse", type=Path, default=None,
                        help="a head_type_reference.pt with the rank-test grids (400 tokens, seed 1)")  # fmt: skip
    parser.add_argument("--table", type=Path, default=None, help="append the markdown rows here")
    parser.add_argument("--name", default=None, help="model name in the table")
    args = parser.parse_args()
    from transformers import AutoTokenizer, LlamaForCausalLM

    source = Path(args.model).expanduser()
    where = {"gguf_file": source.name} if source.suffix == ".gguf" else {}
    directory = source.parent if where else source
    model = LlamaForCausalLM.from_pretrained(
        directory, attn_implementation="eager", dtype=torch.float32, **where
    ).eval()
    tok = AutoTokenizer.from_pretrained(directory, **where)
    ind = independent_scores(model, tok)
    labels = pd.read_csv(args.run / "labels.csv").fillna("")
    ablation = pd.read_csv(args.run / "ablation.csv")
    ok = ablation.groupby(["layer", "head", "label"])["confirmed"].all()
    report = {}
    for label, thr in THRESHOLDS.items():
        got = {
            (int(r.layer), int(r.head)) for r in labels.itertuples() if label in r.labels.split(";")
        }
        truth = {(i // ind[label].shape[1], i % ind[label].shape[1])
                 for i in torch.nonzero(ind[label].flatten() >= thr).flatten().tolist()}  # fmt: skip
        hit = got & truth
        confirmed = sum(bool(ok.get((h[0], h[1], label), False)) for h in got)
        report[label] = {
            "labelled": len(got),
            "independent_positives": len(truth),
            "precision": len(hit) / len(got) if got else None,
            "recall": len(hit) / len(truth) if truth else None,
            "confirmed_fraction": confirmed / len(got) if got else None,
            "labelled_below_0.2": sorted(f"L{h[0]}H{h[1]}" for h in got if ind[label][h] < 0.2),
        }
        print(
            f"{label:<16} labelled {len(got):>3}  independent >= {thr}: {len(truth):>3}  "
            f"precision {report[label]['precision']}  recall {report[label]['recall']}  "
            f"confirmed {confirmed}/{len(got)}  below 0.2: {report[label]['labelled_below_0.2']}"
        )
    prev = ind["previous_token"].flatten()
    top4 = {
        (
            int(i) // prev.numel() * 0 + int(i) // ind["previous_token"].shape[1],
            int(i) % ind["previous_token"].shape[1],
        )
        for i in prev.argsort(descending=True)[:4]
    }
    got = {(int(r.layer), int(r.head)) for r in labels.itertuples()
           if "previous_token" in r.labels.split(";")}  # fmt: skip
    report["previous_token_top4_recovered"] = len(top4 & got)
    print(
        f"induction: {report['induction']['labelled']} labelled, recall of independent >= 0.4: "
        f"{report['induction']['recall']}; previous_token: {len(top4 & got)} of the independent top 4"
    )
    # copying is read from the weights: no attention measurement to compare with, only confirm's
    copying = {(int(r.layer), int(r.head)) for r in labels.itertuples()
               if "copying" in r.labels.split(";")}  # fmt: skip
    decided = ablation[ablation.label == "copying"].groupby(["layer", "head"])["decided_by"].first()
    n_ok = sum(bool(ok.get((*h, "copying"), False)) for h in copying)
    n_own = sum(decided.get(h, "") != "group_only" for h in copying)
    report["copying"] = {"labelled": len(copying), "confirmed": n_ok, "tested_alone": n_own}
    print(f"copying          labelled {len(copying):>3}  confirmed {n_ok}/{len(copying)} "
          f"({n_own} tested alone, the rest by the group test only)")  # fmt: skip
    from lens_attn.scoring.results import DEFAULT_THRESHOLDS

    grids, accuracy = head_type_truths(model, tok, args.reuse, args.run / "head_type_reference.pt")
    rows = head_type_rows(args.name or source.name, labels, grids, DEFAULT_THRESHOLDS)
    for row in rows:
        print(f"{row['label']:<20} labelled {row['labelled']:>3}  independent >= "
              f"{row['threshold']}: {row['positives']:>3}  precision {row['precision']}  "
              f"recall {row['recall']}  (reference max {row['reference_max']})")  # fmt: skip
    print(f"task accuracy (reference): {accuracy}")
    report["head_types"] = rows
    report["task_accuracy"] = accuracy
    if args.table is not None:
        with open(args.table, "a") as handle:
            handle.write(markdown(rows) + "\n")
        print(f"appended {len(rows)} rows to {args.table}")
    report["independent"] = {k: v.tolist() for k, v in ind.items()}
    out = args.run / "label_accuracy.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
