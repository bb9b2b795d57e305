"""Train lens-attn's bundled miniature Llama 2 on CPU: tokenizer, model, model card.

    python experiments/train_tiny_llama.py --out lens_attn/data/tiny-llama-2

Re-measure and rewrite only the model card of an existing checkpoint:

    python experiments/train_tiny_llama.py --out lens_attn/data/tiny-llama-2 --card-only

The model is a transformers ``LlamaForCausalLM`` (RMSNorm, rotary embeddings, SwiGLU MLP, no biases)
with grouped-query attention: 4 layers, 8 query heads sharing 2 key/value heads, d_model 128.

Corpus (offline, ships with every CPython): the documentation topics of ``pydoc_data.topics`` and the
top-level module sources of the standard library (``Lib/*.py``), both under the Python Software
Foundation License v2. One document in twenty is held out for the held-out loss.

Recipe. Natural text alone does not grow an induction head on a CPU budget; mixing repeated sequences in
from the start delays the phase change past it too. A curriculum does:

1. **Phase 1, induction.** Only repeated random-token sequences with a *variable* period (8-60), so the
   model can't solve them with a fixed positional offset. We train until the induction head has formed
   (measured every ``--eval-every`` steps) plus ``--settle-steps``, or ``--phase1-max-steps``.
2. **Phase 2, language.** 50% natural text, 40% repeated random sequences (keeps the circuit alive) and
   10% natural windows in which a span is repeated (repetition as it occurs in real text), with the
   learning rate decayed by a cosine over the last 40% of the steps.

Deterministic for a seed (single-process CPU torch). Writes the checkpoint to ``OUT.tmp`` and renames it.
"""

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class Recipe:
    seed: int = 0
    vocab_size: int = (
        2048  # SentencePiece BPE with byte fallback (256 byte pieces + 3 specials inside)
    )
    n_layers: int = 4
    n_heads: int = 8  # query heads
    n_kv_heads: int = (
        2  # grouped-query attention: 4 query heads per key/value head, as in Llama-2-70B (8)
    )
    d_model: int = 128
    d_mlp: int = 384  # SwiGLU hidden size, ~8/3 * d_model rounded up
    n_ctx: int = 128  # training length and max_position_embeddings
    rope_theta: float = 10000.0
    batch_size: int = 32
    lr: float = 1e-3  # AdamW, constant after warm-up; 1e-3 is where the phase change came fastest
    warmup_steps: int = 100
    weight_decay: float = 0.01
    period_min: int = (
        8  # repeated random sequences: period drawn uniformly from [period_min, period_max]
    )
    period_max: int = 60
    phase1_max_steps: int = 3000
    settle_steps: int = 300  # phase-1 steps kept after the induction head first appears
    induction_formed: float = 0.6  # max-head induction score that counts as "formed"
    phase2_steps: int = 2500
    natural_share: float = 0.5  # phase 2 mix
    repeated_natural_share: float = 0.1
    eval_every: int = 100
    holdout_every: int = 20  # every 20th document is held out


SPECIAL_IDS = (0, 1, 2)  # <unk>, <s>, </s>
BOS = 1


# ----------------------------------------------------------------------------------------------- corpus


def corpus_documents() -> list[tuple[str, str]]:
    """(name, text) of every document, in a fixed order."""
    import pydoc_data.topics
    import sysconfig

    docs = [(f"pydoc_data.topics:{k}", v) for k, v in sorted(pydoc_data.topics.topics.items())]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        docs.append((f"Lib/{path.name}", path.read_text(encoding="utf-8", errors="replace")))
    return docs


def train_tokenizer(train_docs: list[str], workdir: Path, recipe: Recipe) -> Path:
    import sentencepiece as spm

    text_file = workdir / "corpus.txt"
    with open(text_file, "w", encoding="utf-8") as f:
        for doc in train_docs:
            for line in doc.splitlines():
                if line.strip():
                    f.write(line + "\n")
    spm.SentencePieceTrainer.train(
        input=str(text_file),
        model_prefix=str(workdir / "tokenizer"),
        model_type="bpe",
        vocab_size=recipe.vocab_size,
        byte_fallback=True,  # like Llama 2: unknown characters become <0xNN> byte pieces
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,  # the ▁ word-boundary convention
        split_digits=True,
        allow_whitespace_only_pieces=True,  # Python indentation becomes ▁▁▁▁ pieces
        character_coverage=0.9995,
        num_threads=1,  # deterministic
        input_sentence_size=0,
        minloglevel=2,
    )
    return workdir / "tokenizer.model"


# ------------------------------------------------------------------------------------------------ batches


class Batches:
    """Seeded batch maker for the three kinds of training sequence, each [n_ctx] with BOS first."""

    def __init__(self, tokens: list[np.ndarray], recipe: Recipe, rng: np.random.Generator):
        self.recipe = recipe
        self.rng = rng
        # natural text: one long stream of the training documents
        self.stream = np.concatenate(tokens).astype(np.int64)

    def repeated_random(self) -> np.ndarray:
        r = self.recipe
        period = int(self.rng.integers(r.period_min, r.period_max + 1))
        block = self.rng.integers(len(SPECIAL_IDS), r.vocab_size, size=period)
        body = np.tile(block, math.ceil((r.n_ctx - 1) / period))[: r.n_ctx - 1]
        return np.concatenate([[BOS], body])

    def natural(self) -> np.ndarray:
        n = self.recipe.n_ctx - 1
        start = int(self.rng.integers(0, len(self.stream) - n))
        return np.concatenate([[BOS], self.stream[start : start + n]])

    def repeated_natural(self) -> np.ndarray:
        seq = self.natural()
        length = int(self.rng.integers(8, 40))
        src = int(self.rng.integers(1, self.recipe.n_ctx - 2 * length))
        dst = int(self.rng.integers(src + length, self.recipe.n_ctx - length + 1))
        seq[dst : dst + length] = seq[src : src + length]
        return seq

    def batch(self, phase: int) -> torch.Tensor:
        r = self.recipe
        rows = []
        for _ in range(r.batch_size):
            u = self.rng.random()
            if phase == 1 or u >= r.natural_share + r.repeated_natural_share:
                rows.append(self.repeated_random())
            elif u < r.natural_share:
                rows.append(self.natural())
            else:
                rows.append(self.repeated_natural())
        return torch.from_numpy(np.stack(rows))


# ------------------------------------------------------------------------------------------- measurement


def induction_probe(vocab_size: int, period: int, n: int, seed: int) -> torch.Tensor:
    """[n, 1 + 2 * period] sequences [BOS, r_1..r_p, r_1..r_p], r drawn away from the special tokens."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(len(SPECIAL_IDS), vocab_size, (n, period), generator=g)
    return torch.cat([torch.full((n, 1), BOS), r, r], dim=1)


@torch.no_grad()
def quick_measure(model, recipe: Recipe, natural: torch.Tensor) -> dict:
    """Head scores computed straight from transformers' attentions (independent of lens-attn)."""
    model.eval()
    out = {}
    for period in (23, 41):
        tokens = induction_probe(recipe.vocab_size, period, 16, seed=1234 + period)
        res = model(tokens, output_attentions=True)
        q = torch.arange(period + 1, 2 * period + 1)  # second copy
        k = q - period + 1  # the token after the first occurrence
        scores = torch.stack(
            [a[:, :, q, k].mean(dim=(0, 2)) for a in res.attentions]
        )  # [layer, head]
        out[f"induction_{period}"] = scores
        logp = res.logits.log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
        out[f"loss_first_{period}"] = -logp[:, :period].mean().item()
        out[f"loss_second_{period}"] = -logp[:, period:].mean().item()
    res = model(natural, output_attentions=True)
    q = torch.arange(1, natural.shape[1])
    out["previous_token"] = torch.stack(
        [a[:, :, q, q - 1].mean(dim=(0, 2)) for a in res.attentions]
    )
    model.train()
    return out


@torch.no_grad()
def held_out_loss(model, tokens: np.ndarray, n_ctx: int, max_windows: int = 64) -> float:
    model.eval()
    n = n_ctx - 1
    windows = [tokens[i : i + n] for i in range(0, len(tokens) - n, n)][:max_windows]
    batch = torch.from_numpy(np.stack([np.concatenate([[BOS], w]) for w in windows]))
    loss = model(batch, labels=batch).loss.item()
    model.train()
    return loss


def lr_at(step: int, total: int, recipe: Recipe, decay_from: int | None) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    if decay_from is None or step < decay_from:
        return recipe.lr
    frac = (step - decay_from) / max(1, total - decay_from)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


# ------------------------------------------------------------------------------------------------- train


def train(out: Path, recipe: Recipe) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    t0 = time.time()

    docs = corpus_documents()
    held = [d for i, d in enumerate(docs) if i % recipe.holdout_every == recipe.holdout_every - 1]
    kept = [d for i, d in enumerate(docs) if i % recipe.holdout_every != recipe.holdout_every - 1]
    print(f"corpus: {len(docs)} documents ({len(kept)} train, {len(held)} held out)", flush=True)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as work:
        spm_file = train_tokenizer([t for _, t in kept], Path(work), recipe)
        shutil.copy(spm_file, tmp / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(tmp, add_bos_token=True, legacy=False)
    tokenizer.save_pretrained(tmp)
    print(f"tokenizer: {len(tokenizer)} pieces ({time.time() - t0:.0f}s)", flush=True)

    def encode(text: str) -> np.ndarray:
        return np.array(tokenizer(text, add_special_tokens=False).input_ids, dtype=np.int64)

    train_tokens = [encode(t) for _, t in kept]
    held_tokens = np.concatenate([encode(t) for _, t in held])
    print(
        f"tokens: {sum(len(t) for t in train_tokens):,} train, {len(held_tokens):,} held out "
        f"({time.time() - t0:.0f}s)",
        flush=True,
    )

    config = LlamaConfig(
        vocab_size=recipe.vocab_size,
        hidden_size=recipe.d_model,
        intermediate_size=recipe.d_mlp,
        num_hidden_layers=recipe.n_layers,
        num_attention_heads=recipe.n_heads,
        num_key_value_heads=recipe.n_kv_heads,
        max_position_embeddings=recipe.n_ctx,
        rope_theta=recipe.rope_theta,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config)
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=recipe.weight_decay
    )
    batches = Batches(train_tokens, recipe, rng)
    natural_eval = torch.from_numpy(
        np.stack([np.concatenate([[BOS], held_tokens[i : i + 63]]) for i in range(0, 16 * 63, 63)])
    )

    log: dict = {"recipe": asdict(recipe), "steps": [], "evals": []}
    phase, step, formed_at, phase2_start = 1, 0, None, None
    while True:
        if phase == 1 and (
            step >= recipe.phase1_max_steps
            or (formed_at is not None and step >= formed_at + recipe.settle_steps)
        ):
            phase, phase2_start = 2, step
            print(f"phase 2 from step {step}", flush=True)
        if phase == 2 and step >= phase2_start + recipe.phase2_steps:
            break
        total = (phase2_start or 0) + recipe.phase2_steps if phase == 2 else step + 1
        decay_from = phase2_start + int(0.6 * recipe.phase2_steps) if phase == 2 else None
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, recipe, decay_from)
        tokens = batches.batch(phase)
        loss = model(tokens, labels=tokens).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log["steps"].append({"step": step, "phase": phase, "loss": loss.item()})
        step += 1
        if step % recipe.eval_every == 0:
            m = quick_measure(model, recipe, natural_eval)
            ind = min(m["induction_23"].max().item(), m["induction_41"].max().item())
            prev = m["previous_token"].max().item()
            held_loss = held_out_loss(model, held_tokens, recipe.n_ctx, max_windows=32)
            log["evals"].append(
                {
                    "step": step,
                    "phase": phase,
                    "induction": ind,
                    "previous_token": prev,
                    "held_out_loss": held_loss,
                    "seconds": time.time() - t0,
                }
            )
            print(
                f"step {step:5d} phase {phase} loss {loss.item():.3f} held-out {held_loss:.3f} "
                f"induction {ind:.2f} prev-token {prev:.2f} ({time.time() - t0:.0f}s)",
                flush=True,
            )
            if phase == 1 and formed_at is None and ind >= recipe.induction_formed:
                formed_at = step
                print(f"induction head formed at step {step}", flush=True)

    model.eval()
    log["held_out_loss"] = held_out_loss(model, held_tokens, recipe.n_ctx, max_windows=256)
    log["phase2_start"] = phase2_start
    log["induction_formed_at"] = formed_at
    log["train_seconds"] = time.time() - t0
    log["corpus"] = {
        "documents": [name for name, _ in kept],
        "held_out": [name for name, _ in held],
        "python": sys.version.split()[0],
    }
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / "train_log.json").write_text(json.dumps(log))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(
        f"wrote {out} ({time.time() - t0:.0f}s, held-out loss {log['held_out_loss']:.3f})",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("lens_attn/data/tiny-llama-2"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--card-only", action="store_true", help="only re-measure and rewrite the card"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    if not args.card_only:
        train(args.out, Recipe(seed=args.seed))
    from model_card import write_model_card  # experiments/model_card.py

    write_model_card(args.out)
    print(f"model card: {args.out / 'README.md'}")


if __name__ == "__main__":
    main()
