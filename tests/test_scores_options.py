"""``score_heads``'s TransformerLens options against ``transformer_lens.head_detector.detect_head``.

``exclude_bos`` and ``exclude_current_token`` have detect_head's names and meanings; ``heads=`` and
``cache=`` score a subset of heads, and from an existing ``ActivationCache``. "mul" scores are float32
sums over at most 20x20 weights (1e-6 leaves room for summation order only); detect_head rounds "abs"
scores to 3 decimals, so they agree within half of 1e-3 plus float rounding.
"""

import pytest
import torch
from transformer_lens.head_detector import detect_head

from lens_attn.scoring.protocol import DetectionPattern
from lens_attn.scoring.runner import score_heads

PROMPTS = [
    "the cat sat on the mat and the cat sat on the mat",
    "When Mary and John went to the store, John gave a drink to Mary",
]
TL_NAMES = {
    "previous_token": "previous_token_head",
    "duplicate_token": "duplicate_token_head",
    "induction": "induction_head",
}
FLAGS = [(True, False), (False, True), (True, True)]
FLAG_IDS = ["bos", "current", "both"]


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    from lens_attn.loading import load_model

    return {kind: load_model(ckpt.path, device="cpu") for kind, ckpt in tiny_checkpoints.items()}


def _previous(tokens):
    n = len(tokens)
    pattern = torch.zeros(n, n)
    pattern[torch.arange(1, n), torch.arange(n - 1)] = 1
    return pattern


@pytest.mark.parametrize("kind", ["mha", "gqa"])
@pytest.mark.parametrize(("exclude_bos", "exclude_current_token"), FLAGS, ids=FLAG_IDS)
def test_exclude_flags_equal_detect_head_mul(models, kind, exclude_bos, exclude_current_token):
    model = models[kind]
    flags = dict(exclude_bos=exclude_bos, exclude_current_token=exclude_current_token)
    for prompt in PROMPTS:
        ours = score_heads(
            model, [prompt], scores=list(TL_NAMES), normalize="all_rows", progress=False, **flags
        )
        for name, tl_name in TL_NAMES.items():
            reference = detect_head(model, prompt, tl_name, error_measure="mul", **flags)
            torch.testing.assert_close(ours[name], reference.float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("exclude_bos", "exclude_current_token"), FLAGS, ids=FLAG_IDS)
def test_exclude_flags_equal_detect_head_for_detection_patterns(
    models, exclude_bos, exclude_current_token
):
    model = models["gqa"]
    flags = dict(exclude_bos=exclude_bos, exclude_current_token=exclude_current_token)
    analyses = [DetectionPattern(f"prev_{m}", _previous, measure=m) for m in ("mul", "abs")]
    prompt = PROMPTS[1]
    ours = score_heads(model, [prompt], scores=analyses, progress=False, **flags)
    target = _previous(model.to_tokens(prompt)[0])
    for measure, atol in [("mul", 1e-6), ("abs", 5e-4 + 1e-6)]:
        reference = detect_head(model, prompt, target, error_measure=measure, **flags)
        torch.testing.assert_close(ours[f"prev_{measure}"], reference.float(), atol=atol, rtol=0)


def test_exclude_flags_change_the_scores_and_are_recorded(models):
    model = models["gqa"]
    plain = score_heads(model, PROMPTS, scores=["previous_token"], progress=False)
    excluded = score_heads(
        model, PROMPTS, scores=["previous_token"], exclude_bos=True, progress=False
    )
    assert (plain["previous_token"] - excluded["previous_token"]).abs().max() > 1e-3
    assert excluded.provenance["exclude_bos"] is True
    assert excluded.provenance["exclude_current_token"] is False
