"""Head discovery written out step by step with lens-attn's public API: a recipe to copy from.

    python experiments/discover_heads.py
    python experiments/discover_heads.py --model ~/models/Llama-2-7b-hf --out runs/7b
    python experiments/discover_heads.py --prompts-per-kind 4     # a quick look

``lens-attn discover`` (``lens_attn.discover``) does the same in one call; here every step is a
few visible lines:

1. ``load_model``: the bundled tiny Llama 2 by default, or ``--model``.
2. ``score_heads`` on the built-in probes: one streaming forward pass per batch for every score.
3. ``HeadScores.classify``: labels from the default thresholds.
4. ``confirm``: ablate every labelled head on the probes its label predicts it matters for
   (one batched ``ablation_sweep`` over every head per test); plus the full ``ablation_sweep`` on
   repeated random probes measured with ``induction_loss`` (taken from ``confirm`` if it ran it).
5. Figures (``lens_attn.render.figures``): score heatmaps, the ablation heatmap, the top heads' maps.
6. ``render_report``: the offline HTML report of one prompt's patterns with the score grids.
7. ``heads.csv``: one row per head with its scores, labels, ablation effect and verdicts.

Everything goes into ``--out`` (default ``runs/discover_heads``): ``heads.csv``, ``scores.csv`` and
``scores.json``, ``sweep/`` and ``confirm/`` (``AblationResult.save`` / ``ConfirmResult.save``),
``figures/*.png``, ``report.html``. The folder is written under a temporary name and renamed at the
end, so a reader never sees half a run; an existing folder of that name is replaced.
"""

import argparse
import os
import shutil
import time
from pathlib import Path

SCORE_FIGURES = ("induction", "previous_token", "duplicate_token", "current_token", "bos")
PROMPT = (
    "The river flows from the mountains to the sea, past three small towns. "
    "The river flows from the mountains to the sea, past three small towns."
)  # a sentence written twice: induction heads light up on the second copy


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from lens_attn.ablation.methods import METHODS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model source (default: bundled checkpoint)")
    parser.add_argument("--out", type=Path, default=Path("runs/discover_heads"), help="run folder")
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, mps (default: cuda if available)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass")
    parser.add_argument("--method", choices=METHODS, default="zero", help="ablation method")
    parser.add_argument("--seed", type=int, default=0, help="probe seed (default 0)")
    parser.add_argument(
        "--prompts-per-kind",
        type=int,
        default=None,
        metavar="N",
        help="keep only N probes of each kind (default: all 32 + 32 + 16)",
    )
    parser.add_argument("--prompt", default=PROMPT, help="the report's prompt")
    return parser.parse_args(argv)


def probes_by_kind(model, *, seed: int, keep: int | None) -> dict[str, list]:
    """The built-in probes grouped by kind, each group cut to ``keep`` probes if given."""
    from lens_attn.ablation.confirm import default_probes

    return {kind: probes[:keep] for kind, probes in default_probes(model, seed=seed).items()}


def heads_table(scores, labels, sweep, confirmation):
    """One row per head: ``unit, layer, head, labels``, the scores, the sweep's delta, verdicts."""
    import pandas as pd

    df = scores.to_dataframe()  # layer, head, unit ("L1H5"), <score>, <score>_stderr
    heads = list(zip(df["layer"], df["head"], strict=True))
    df.insert(3, "labels", [";".join(labels.labels[head]) for head in heads])
    grid, errors = sweep.grid(), sweep.to_dataframe().set_index("unit")["stderr"]
    df[f"{sweep.metric}_delta"] = [float(grid[head]) for head in heads]
    df[f"{sweep.metric}_delta_stderr"] = [float(errors.get(u, float("nan"))) for u in df.unit]
    verdicts = pd.DataFrame(
        [(t.layer, t.head, t.label, t.confirmed, t.significant) for t in confirmation.tests],
        columns=["layer", "head", "kind", "confirmed", "significant"],
    )

    def kinds(layer: int, head: int, column: str, value: bool) -> str:
        """The head's labels whose tests all have ``column == value`` (all passed / not all)."""
        rows = verdicts[(verdicts["layer"] == layer) & (verdicts["head"] == head)]
        passed = rows.groupby("kind", sort=False)[column].all()
        return ";".join(kind for kind, ok in passed.items() if bool(ok) == value)

    df["confirmed"] = [kinds(*head, "confirmed", True) for head in heads]
    df["significant"] = [kinds(*head, "significant", True) for head in heads]
    df["not_confirmed"] = [kinds(*head, "confirmed", False) for head in heads]
    return df


def write_csv(df, path: Path) -> Path:
    from lens_attn.files import write_text_atomic

    return write_text_atomic(path, df.to_csv(index=False))


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` folder to ``out``, replacing an older run there."""
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None, *, model=None) -> Path:
    """Run the recipe (on ``model`` if given, else ``--model``); return the run folder."""
    args = parse_args(argv)
    import lens_attn
    from lens_attn.ablation.confirm import confirm
    from lens_attn.render.terminal import score_table

    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "figures").mkdir(parents=True)
    start = time.perf_counter()
    try:
        # 1. the model: a HookedTransformer with blocks.<l>.attn.hook_pattern in every layer
        if model is None:
            model = lens_attn.load_model(args.model, device=args.device)
        cfg = model.cfg
        print(f"1. model: {cfg.n_layers} layers x {cfg.n_heads} heads, d_head {cfg.d_head}")

        # 2. scores: every built-in score of every head, one forward pass per batch
        probes = probes_by_kind(model, seed=args.seed, keep=args.prompts_per_kind)
        all_probes = [p for group in probes.values() for p in group]
        scores = lens_attn.score_heads(model, all_probes, batch_size=args.batch_size)
        scores.save(tmp)  # scores.csv + scores.json
        names = ["previous_token", "induction", "duplicate_token", "current_token", "bos"]
        print(f"2. scores on {len(all_probes)} probes; top induction heads:")
        print(score_table(scores, names=names, sort_by="induction", top=5))

        # 3. labels: every head type whose score passes its threshold
        labels = scores.classify()
        for label, threshold in labels.thresholds.items():
            heads = ", ".join(lens_attn.head_label(*h) for h in labels.heads_with(label)) or "none"
            print(f"3. {label} (>= {threshold:g}): {heads}")

        # 4. causal check: ablate each labelled head where its label says it should matter
        confirmation = confirm(model, scores, labels=labels, method=args.method, probes=probes)
        confirmation.save(tmp / "confirm")
        sweep = confirmation.sweeps.get("repeated_random/induction_loss")
        if sweep is None:  # no label needed that test: run the sweep over every head directly
            sweep = lens_attn.ablation_sweep(
                model, probes["repeated_random"], method=args.method, metric="induction_loss"
            )
        sweep.save(tmp / "sweep")
        tests = confirmation.to_dataframe()
        n_ok, n_sig = int(tests["confirmed"].sum()), int(tests["significant"].sum())
        print(
            f"4. {args.method} ablation: {n_ok} of {len(tests)} label tests confirmed, {n_sig} "
            "by more than 2 standard errors; largest induction_loss increases:"
        )
        print(
            sweep.to_dataframe()
            .sort_values("delta", ascending=False)
            .head(3)
            .to_string(index=False)
        )

        # 5. figures: score heatmaps, the ablation heatmap, the strongest heads on one prompt
        patterns = lens_attn.capture_patterns(model, args.prompt)
        figures = {f"scores_{name}": lens_attn.plot_scores(scores, name) for name in SCORE_FIGURES}
        figures["ablation_induction_loss"] = lens_attn.plot_ablation(sweep)
        for label in ("induction", "previous_token"):
            layer, head, _ = scores.top(label, 1)[0]
            figures[f"top_{label}_{lens_attn.head_label(layer, head)}"] = lens_attn.plot_head(
                patterns, layer, head
            )
        layer = scores.top("induction", 1)[0][0]
        figures[f"layer{layer}"] = lens_attn.plot_layer(patterns, layer)
        for name, fig in figures.items():
            lens_attn.save_figure(fig, tmp / "figures" / f"{name}.png", dpi=100)
        print(f"5. {len(figures)} figures")

        # 6. the offline report, opened on the strongest induction head
        top = scores.top("induction", 1)[0][:2]
        title = f"discover_heads: {args.model or 'the bundled checkpoint'}"
        lens_attn.render_report(
            patterns, scores, path=tmp / "report.html", open_head=top, title=title
        )
        print("6. report.html")

        # 7. one table with everything per head
        write_csv(heads_table(scores, labels, sweep, confirmation), tmp / "heads.csv")
        print("7. heads.csv")
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only left behind if a step failed
    files = "heads.csv, scores.csv, scores.json, report.html, figures/, sweep/, confirm/"
    print(f"wrote {out}/ in {time.perf_counter() - start:.0f} s: {files}")
    return out


if __name__ == "__main__":
    main()
