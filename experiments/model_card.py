"""Measure the bundled checkpoint with lens-attn and write its model card (``README.md`` inside it).

    python experiments/model_card.py lens_attn/data/tiny-llama-2

Called by ``train_tiny_llama.py`` after training; run it alone to re-measure an existing checkpoint.
Writes ``README.md``, ``loss_curve.png`` and ``measurements.json`` next to the weights.
"""

import argparse
import json
from pathlib import Path

import torch

import lens_attn
from lens_attn.discover import HEATMAP_SCORES
from lens_attn.files import write_text_atomic
from lens_attn.probes import induction_probes, pad


def loss_curve(log: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    steps = [s["step"] for s in log["steps"]]
    loss = [s["loss"] for s in log["steps"]]
    smooth = torch.tensor(loss).unfold(0, 50, 1).mean(-1).tolist() if len(loss) > 50 else loss
    fig = Figure(figsize=(6.5, 3.2), dpi=110)
    ax = fig.add_subplot()
    ax.plot(steps, loss, color="0.8", lw=0.5, label="training loss")
    ax.plot(steps[len(steps) - len(smooth) :], smooth, color="C0", lw=1.2, label="mean of 50 steps")
    evals = log["evals"]
    ax.plot(
        [e["step"] for e in evals],
        [e["held_out_loss"] for e in evals],
        "o-",
        ms=2,
        color="C1",
        label="held-out natural text",
    )
    if log.get("phase2_start") is not None:
        ax.axvline(log["phase2_start"], color="k", ls=":", lw=1)
        ax.text(log["phase2_start"], ax.get_ylim()[1], " phase 2", va="top", fontsize=8)
    ax2 = ax.twinx()
    ax2.plot(
        [e["step"] for e in evals],
        [e["induction"] for e in evals],
        color="C2",
        lw=1,
        label="max induction score",
    )
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("induction score", color="C2")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


@torch.no_grad()
def copy_losses(model, period: int) -> tuple[float, float]:
    """Mean next-token loss on the first and the second copy of ``[BOS, r, r]``."""
    tokens, _ = pad(induction_probes(model, periods=(period,), n_per_period=32, seed=7))
    logp = model(tokens.to(model.cfg.device)).log_softmax(-1)[:, :-1]
    nll = -logp.gather(-1, tokens[:, 1:, None].to(logp.device))[..., 0]  # [batch, pos - 1]
    return nll[:, : period - 1].mean().item(), nll[:, period:].mean().item()


def measure(directory: Path) -> dict:
    model = lens_attn.load_model(directory, device="cpu")
    scores = lens_attn.score_heads(model, progress=False)
    per_period = {
        p: lens_attn.score_heads(
            model,
            induction_probes(model, periods=(p,), seed=7),
            scores=["induction"],
            progress=False,
        )["induction"]
        for p in (23, 41)
    }
    induction_grid = torch.minimum(per_period[23], per_period[41])
    ind_layer, ind_head = divmod(int(induction_grid.argmax()), model.cfg.n_heads)
    prev = scores["previous_token"]
    earlier = prev[:ind_layer] if ind_layer > 0 else prev[:0]
    prev_layer, prev_head = (
        divmod(int(earlier.argmax()), model.cfg.n_heads) if earlier.numel() else (None, None)
    )
    group = model.cfg.n_heads // (model.cfg.n_key_value_heads or model.cfg.n_heads)
    labels = scores.classify()
    first, second = {}, {}
    for p in (23, 41):
        first[p], second[p] = copy_losses(model, p)
    return {
        "model": model,
        "scores": scores,
        "labels": labels,
        "induction_head": (ind_layer, ind_head),
        "induction_23": float(per_period[23][ind_layer, ind_head]),
        "induction_41": float(per_period[41][ind_layer, ind_head]),
        "previous_token_head": (prev_layer, prev_head),
        "previous_token_score": float(prev[prev_layer, prev_head])
        if prev_layer is not None
        else None,
        "kv_group_size": group,
        "induction_heads": labels.heads_with("induction"),
        "loss_first_copy": first,
        "loss_second_copy": second,
    }


def write_model_card(directory: Path) -> Path:
    directory = Path(directory)
    log = json.loads((directory / "train_log.json").read_text())
    config = json.loads((directory / "config.json").read_text())
    loss_curve(log, directory / "loss_curve.png")
    m = measure(directory)
    scores, labels = m["scores"], m["labels"]
    il, ih = m["induction_head"]
    pl, ph = m["previous_token_head"]
    recipe = log["recipe"]
    kv = lambda h: h // m["kv_group_size"]  # noqa: E731

    notable = [(layer, head) for (layer, head), lab in sorted(labels.labels.items()) if lab]
    df = scores.to_dataframe()
    cols = list(HEATMAP_SCORES)  # the scores discover draws
    lines = [
        "| head | kv head | labels | " + " | ".join(cols) + " |",
        "|" + "---|" * (len(cols) + 3),
    ]
    for layer, head in notable:
        row = df[(df["layer"] == layer) & (df["head"] == head)].iloc[0]
        lines.append(
            f"| L{layer}H{head} | {kv(head)} | {', '.join(labels.labels[(layer, head)])} | "
            + " | ".join(f"{row[c]:.2f}" for c in cols)
            + " |"
        )
    head_table = "\n".join(lines)
    ind_heads = ", ".join(f"L{a}H{b} (kv head {kv(b)})" for a, b in m["induction_heads"]) or "none"
    loss_lines = "\n".join(
        f"| {p} | {m['loss_first_copy'][p]:.2f} | {m['loss_second_copy'][p]:.2f} | "
        f"{m['loss_first_copy'][p] - m['loss_second_copy'][p]:.2f} |"
        for p in (23, 41)
    )
    corpus = log["corpus"]
    text = (
        f"""# tiny-llama-2: lens-attn's bundled miniature Llama 2

A `LlamaForCausalLM` trained on CPU by `experiments/train_tiny_llama.py` (seed {recipe["seed"]}) so that
lens-attn's main command, notebooks and behaviour tests run on a model with real, learned heads. It is
not a useful language model; it is a specimen with a previous-token -> induction circuit.

## Architecture

{config["num_hidden_layers"]} layers, d_model {config["hidden_size"]}, {config["num_attention_heads"]} query heads sharing
{config["num_key_value_heads"]} key/value heads (grouped-query attention, {m["kv_group_size"]} query heads per key/value
head, as in Llama-2-70B), head_dim {config["hidden_size"] // config["num_attention_heads"]}, SwiGLU MLP {config["intermediate_size"]},
RMSNorm, rotary embeddings (theta {recipe["rope_theta"]:g}), no biases, untied embeddings, context {config["max_position_embeddings"]}.

Tokenizer: SentencePiece BPE with byte fallback, {recipe["vocab_size"]} pieces, `<unk>`=0, `<s>`=1,
`</s>`=2, the `▁` word-boundary convention, identity normalisation; loads with transformers' `LlamaTokenizer`.

## Corpus

Offline and on every machine with CPython: the documentation topics of `pydoc_data.topics` and the
top-level module sources of the standard library (`Lib/*.py`), of CPython {corpus["python"]}, under the
Python Software Foundation License v2. {len(corpus["documents"])} documents for training,
{len(corpus["held_out"])} held out (every 20th: {", ".join(corpus["held_out"][:4])}, ...).
The training mix adds sequences with repeated spans on purpose (see the recipe): natural text repeats,
and repetition speeds up the formation of induction heads.

## Recipe

A curriculum: phase 1 trains only on repeated random-token sequences with a variable period
({recipe["period_min"]}-{recipe["period_max"]}) until an induction head forms (it did at step
{log["induction_formed_at"]}), plus {recipe["settle_steps"]} steps; phase 2 (from step {log["phase2_start"]},
{recipe["phase2_steps"]} steps) mixes {recipe["natural_share"]:.0%} natural text, {recipe["repeated_natural_share"]:.0%} natural
windows with a repeated span and the rest repeated random sequences, with a cosine decay over its last 40%.

| hyper-parameter | value |
|---|---|
"""
        + "\n".join(f"| {k} | {v} |" for k, v in recipe.items())
        + f"""

Training took {log["train_seconds"] / 60:.0f} minutes on 2 CPU cores.

![loss curve](loss_curve.png)

Held-out loss on natural text (the held-out documents): **{log["held_out_loss"]:.3f} nats/token**
(uniform over the vocabulary would be {torch.log(torch.tensor(float(recipe["vocab_size"]))).item():.2f}).

## Notable heads, as measured by lens-attn

`lens_attn.score_heads(model)` on the built-in probes, heads with at least one label from
`HeadScores.classify()` (default thresholds):

{head_table}

- **Induction head: L{il}H{ih}.** On `[BOS, r_1..r_n, r_1..r_n]` with random tokens away from the specials,
  its mean attention from the second copy to the token after the first occurrence is
  {m["induction_23"]:.2f} at period 23 and {m["induction_41"]:.2f} at period 41, so it is induction, not
  a fixed offset. Heads labelled induction: {ind_heads}.
- **Previous-token head: L{pl}H{ph}**, mean attention to the previous token {m["previous_token_score"]:.2f},
  in layer {pl}, before the induction head's layer {il}: the previous-token -> induction circuit.

`experiments/induction_circuit.py` tests the circuit causally: zero-ablating the previous-token head
collapses every layer-1 induction score (to ~0.04) through layer 1's keys (K-composition), while the
current-token head L0H1 is needed through layer 1's queries; a control head of layer 0 leaves the
induction scores intact. With all eight layer-1 heads doing induction, each one alone is nearly
redundant under ablation.

Loss on repeated random sequences (nats/token):

| period | first copy | second copy | drop |
|---|---|---|---|
{loss_lines}
"""
    )
    write_text_atomic(directory / "README.md", text)
    summary = {k: v for k, v in m.items() if k not in ("model", "scores", "labels")}
    write_text_atomic(directory / "measurements.json", json.dumps(summary, indent=1, default=str))
    return directory / "README.md"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "directory", type=Path, nargs="?", default=Path("lens_attn/data/tiny-llama-2")
    )
    args = parser.parse_args()
    print(f"wrote {write_model_card(args.directory)}")
