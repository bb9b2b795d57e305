"""Scores of a bfloat16 model: how far from float32, and why.

Three models of one float32 checkpoint: ``f32`` (float32), ``rounded`` (float32 arithmetic on the
bfloat16 model's weights, i.e. only the weights rounded) and ``bf16`` (bfloat16 weights and
arithmetic). ``rounded - f32`` is what rounding the weights does; ``bf16 - rounded`` what bfloat16
arithmetic in the forward pass does; and the reduction's own error is measured separately by
scoring the bfloat16 model's own patterns twice, once as they are and once upcast to float64
(``score_heads(cache=...)``): it must be float32 noise, since patterns are scored in float32
(``Batch.scored_pattern``). Labels of ``bf16`` and ``f32`` may differ only on heads whose score
lies within the measured difference of the label's threshold.
"""

import pytest
import torch
from score_references import reference_analyses
from transformer_lens.utilities import get_act_name

from lens_attn.loading import BUNDLED_CHECKPOINT, load_model
from lens_attn.probes import builtin_probes, group_by_kind
from lens_attn.scoring.builtin import BUILTIN_SCORES
from lens_attn.scoring.runner import score_heads

# Pattern scores in [0, 1] (``mean_distance`` is in positions, ``offset`` an integer argmax, both
# compared relative to the probes' length below; ``copying`` reads the weights).
UNIT_SCORES = ("previous_token", "current_token", "duplicate_token", "induction", "bos",
               "entropy", "confidence", "sparsity")  # fmt: skip
# bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 0.002 per value). Measured on these
# models (largest over heads, total bfloat16 - float32): 0.0001-0.0015 on the [0, 1] scores (sparsity
# the largest), 0.004-0.018 positions on mean_distance, weights and arithmetic each about half.
# The bounds are ~3x that. Deeper models drift further (SmolLM2-135M: experiments/real_size.md).
BF16_TOLERANCE = 0.005
BF16_DISTANCE_TOLERANCE = 0.05  # positions
# float32's round-off over sums of a few thousand terms, relative: what the reduction may add
FLOAT32_NOISE = 1e-5


def _probes(model):
    sets = group_by_kind(builtin_probes(model, seed=3))
    return [p for kind in ("natural", "repeated_random", "repeated_tokens") for p in sets[kind][:6]]


def _models(path):
    f32 = load_model(path, device="cpu", progress=False)
    bf16 = load_model(path, device="cpu", dtype="bfloat16", progress=False)
    rounded = load_model(path, device="cpu", progress=False)
    weights = dict(bf16.named_parameters())
    with torch.no_grad():
        for name, param in rounded.named_parameters():
            param.copy_(weights[name].float())
    return f32, rounded, bf16


def _grids(model, probes):
    scores = score_heads(model, probes, scores=BUILTIN_SCORES, progress=False)
    return scores, {name: scores.values[name] for name in scores.values}


@pytest.mark.parametrize("kind", ["mha", "gqa", "bundled"])
def test_bfloat16_scores_split_into_weights_and_arithmetic(tiny_checkpoints, kind):
    """``bundled``: the trained tiny model, whose induction and previous-token heads are real."""
    path = BUNDLED_CHECKPOINT if kind == "bundled" else tiny_checkpoints[kind].path
    f32, rounded, bf16 = _models(path)
    probes = _probes(f32)
    s32, g32 = _grids(f32, probes)
    _, g_rounded = _grids(rounded, probes)
    sb, gb = _grids(bf16, probes)
    for name in UNIT_SCORES:
        weights = (g_rounded[name] - g32[name]).abs().nan_to_num().max()
        arithmetic = (gb[name] - g_rounded[name]).abs().nan_to_num().max()
        total = (gb[name] - g32[name]).abs().nan_to_num().max()
        assert total <= BF16_TOLERANCE, (name, total)
        assert total <= weights + arithmetic + 1e-6  # the triangle inequality: a sanity check
        assert weights > 0 or arithmetic > 0  # the comparison is not vacuous
    distance = (gb["mean_distance"] - g32["mean_distance"]).abs().nan_to_num().max()
    assert distance <= BF16_DISTANCE_TOLERANCE, distance

    # labels: a head may change label only if its score is within the measured difference of
    # the threshold
    labels32, labels_b = s32.classify(), sb.classify()
    for head, labs in labels32.labels.items():
        for label in set(labs) ^ set(labels_b.labels[head]):
            threshold = labels32.thresholds[label]
            score = s32.label_score(label)
            gap = (sb.label_score(label) - score).abs().nan_to_num().max()
            assert abs(float(score[head]) - threshold) <= gap, (head, label)


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_reduction_of_bfloat16_patterns_is_float32_noise(tiny_checkpoints, kind):
    """The bfloat16 model's own patterns scored twice: by the built-ins as they are (bfloat16),
    and by the one-score-at-a-time reference formulas (``score_references.py``) on the same
    patterns upcast to float64, where every sum is float64's. The difference is the reduction's
    own error: float32 round-off, nothing of bfloat16's."""
    model = load_model(tiny_checkpoints[kind].path, device="cpu", dtype="bfloat16", progress=False)
    probes = _probes(model)
    same_length = [p for p in probes if len(p.tokens) == len(probes[0].tokens)]
    tokens = torch.stack([p.tokens for p in same_length])
    names = [get_act_name("pattern", layer) for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
    as_is = {name: cache[name] for name in names}
    assert as_is[names[0]].dtype == torch.bfloat16
    references = [a for a in reference_analyses() if a.name.removeprefix("ref_") in UNIT_SCORES]
    assert len(references) >= 6
    ours = score_heads(model, same_length, scores=list(UNIT_SCORES), cache=as_is, progress=False)
    exact = score_heads(model, same_length, scores=references, progress=False,
                        cache={name: cache[name].double() for name in names})  # fmt: skip
    for analysis in references:
        name = analysis.name.removeprefix("ref_")
        diff = (ours.values[name] - exact.values[analysis.name]).abs().nan_to_num().max()
        assert diff <= FLOAT32_NOISE, (name, diff)
