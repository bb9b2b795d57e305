"""Size of lens-attn's offline HTML report against CircuitsVis's own render of the same patterns.

    python experiments/bench_render.py            # bundled checkpoint, 128-token prompt
    python experiments/bench_render.py --out runs/bench-render

Captures every layer's pattern for one 128-token prompt (natural text from the shipped prompts),
writes ``lens_attn.render.report.render_report`` for all layers, and compares its size with CircuitsVis's
``circuitsvis.attention.attention_heads`` for the same patterns, one view per layer, summed (the
self-contained ``local_src`` each view would display offline). The target is a ratio <= 1/4.

Without the bundled checkpoint (``lens_attn/data/tiny-llama-2``) it falls back, with a warning, to a
random-init model of the same shape (4 layers x 8 heads, 2 key/value heads) on random token ids.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch


def random_model(n_ctx: int):
    """A random-init Llama-shaped HookedTransformer like the bundled one (no tokenizer)."""
    from lens_attn.compat import HookedTransformer, HookedTransformerConfig  # TransformerLens 3.9

    cfg = HookedTransformerConfig(
        n_layers=4, d_model=128, n_heads=8, d_head=16, n_key_value_heads=2, d_mlp=344,
        d_vocab=2048, n_ctx=n_ctx, act_fn="silu", normalization_type="RMS",
        positional_embedding_type="rotary", rotary_dim=16, gated_mlp=True, seed=0,
    )  # fmt: skip
    return HookedTransformer(cfg)


def prompt_tokens(model, n_tokens: int) -> torch.Tensor:
    """``[1, n_tokens]``: BOS + natural text when the model has a tokenizer, else random ids."""
    if model.tokenizer is None:
        g = torch.Generator().manual_seed(0)
        body = torch.randint(3, model.cfg.d_vocab, (1, n_tokens - 1), generator=g)
        return torch.cat([torch.ones(1, 1, dtype=torch.long), body], dim=1)
    from lens_attn.probes import natural_prompts

    tokens = model.to_tokens(" ".join(natural_prompts()), prepend_bos=True)[:, :n_tokens]
    if tokens.shape[1] < n_tokens:
        raise ValueError(f"the shipped prompts give only {tokens.shape[1]} tokens; need {n_tokens}")
    return tokens.cpu()


def capture(model, tokens: torch.Tensor):
    """Every layer's pattern; without a tokenizer the tokens are shown as their ids."""
    from transformer_lens.utilities import get_act_name

    from lens_attn.patterns import AttentionPatterns, capture_patterns

    if model.tokenizer is not None:
        return capture_patterns(model, tokens)
    layers = list(range(model.cfg.n_layers))
    with torch.no_grad():
        _, cache = model.run_with_cache(
            tokens, names_filter=lambda name: name.endswith("hook_pattern")
        )
    pattern = torch.stack([cache[get_act_name("pattern", layer)] for layer in layers]).float()
    str_tokens = [[f" {t}" for t in row.tolist()] for row in tokens]
    return AttentionPatterns(
        pattern, layers, tokens, torch.ones_like(tokens, dtype=torch.bool), str_tokens
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128, help="prompt length, BOS included")
    parser.add_argument("--out", type=Path, default=None, help="where to keep report.html")
    args = parser.parse_args(argv)

    import circuitsvis.attention

    from lens_attn.loading import BUNDLED_CHECKPOINT, load_model
    from lens_attn.render.report import circuitsvis_bundle, render_report

    if BUNDLED_CHECKPOINT.is_dir():
        model = load_model(device="cpu")
        source = str(BUNDLED_CHECKPOINT)
    else:
        print(f"WARNING: {BUNDLED_CHECKPOINT} is missing (experiments/train_tiny_llama.py builds "
              "it); using a random-init model of the same shape on random token ids",
              file=sys.stderr)  # fmt: skip
        model = random_model(max(args.tokens, 128))
        source = "random-init 4 x 8 GQA model"
    patterns = capture(model, prompt_tokens(model, args.tokens))
    n_layers, n_heads = len(patterns.layers), patterns.n_heads

    out = args.out or Path(tempfile.mkdtemp(prefix="bench-render-"))
    start = time.perf_counter()
    path = render_report(patterns, path=out / "report.html", title="bench_render")
    ours_seconds = time.perf_counter() - start
    ours = path.stat().st_size

    start = time.perf_counter()
    theirs = sum(
        len(circuitsvis.attention.attention_heads(patterns.layer(layer), patterns.str_tokens[0])
            .local_src.encode("utf-8"))
        for layer in patterns.layers
    )  # fmt: skip
    theirs_seconds = time.perf_counter() - start
    bundle = len(circuitsvis_bundle().encode("utf-8"))

    print(f"model: {source}; {n_layers} layers x {n_heads} heads; prompt of {args.tokens} tokens")
    print(f"lens-attn report, all layers in one file: {ours / 1e6:6.2f} MB ({ours_seconds:.2f} s)")
    print(f"  the CircuitsVis bundle, embedded once:  {bundle / 1e6:6.2f} MB")
    print(f"  patterns, tokens and the page:          {(ours - bundle) / 1e6:6.2f} MB")
    print(f"CircuitsVis attention_heads x {n_layers} layers:  {theirs / 1e6:6.2f} MB "
          f"({theirs_seconds:.2f} s)")  # fmt: skip
    print(f"ratio lens-attn / CircuitsVis: {ours / theirs:.3f} (target <= 0.25)")
    print(f"wrote {path}")
    return 0 if ours <= theirs / 4 else 1


if __name__ == "__main__":
    sys.exit(main())
