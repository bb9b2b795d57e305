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


def test_heads_subset_equals_detect_head(models):
    model = models["gqa"]
    prompt = PROMPTS[0]
    chosen = [(0, 1), (1, 5), (2, 0)]
    ours = score_heads(
        model, [prompt], scores=list(TL_NAMES), normalize="all_rows", heads=chosen, progress=False
    )
    for name, tl_name in TL_NAMES.items():
        reference = detect_head(model, prompt, tl_name, heads=chosen).float()
        asked = reference != -1  # detect_head: -1 for the heads not asked for; lens-attn: NaN
        assert asked.sum() == len(chosen) and torch.isnan(ours[name][~asked]).all()
        torch.testing.assert_close(ours[name][asked], reference[asked], atol=1e-6, rtol=0)
    as_dict = score_heads(
        model, [prompt], scores=["induction"], heads={0: [1], 1: [5], 2: [0]}, progress=False
    )
    as_specs = score_heads(
        model, [prompt], scores=["induction"], heads=["L0H1", "L1H5", "L2H0"], progress=False
    )
    torch.testing.assert_close(as_dict["induction"], as_specs["induction"], equal_nan=True)
    assert [(layer, head) for layer, head, _ in as_specs.top("induction", 5)] == sorted(
        chosen, key=lambda h: -float(as_specs["induction"][h])
    )


@pytest.mark.parametrize("remove_batch_dim", [True, False], ids=["one-prompt", "batched"])
def test_scores_from_a_cache_equal_the_streaming_pass(models, remove_batch_dim):
    model = models["mha"]
    tokens = model.to_tokens(PROMPTS[1])
    _, cache = model.run_with_cache(tokens, remove_batch_dim=remove_batch_dim)
    names = ["previous_token", "induction", "entropy"]
    streamed = score_heads(model, tokens, scores=names, progress=False)
    cached = score_heads(model, tokens, scores=names, cache=cache, progress=False)
    for name in names:
        torch.testing.assert_close(cached[name], streamed[name], atol=1e-6, rtol=0)
    assert cached.provenance["from_cache"] is True
    # the same cache, read by detect_head
    tl = detect_head(model, PROMPTS[1], "induction_head", cache=cache if remove_batch_dim else None)
    ours = score_heads(model, tokens, scores=["induction"], normalize="all_rows", cache=cache,
                       progress=False)  # fmt: skip
    torch.testing.assert_close(ours["induction"], tl.float(), atol=1e-6, rtol=0)


def test_cache_that_does_not_fit_is_refused(models):
    model = models["mha"]
    tokens = model.to_tokens(PROMPTS[1])
    _, cache = model.run_with_cache(tokens)
    with pytest.raises(ValueError, match="not a run on these 2 prompts"):
        score_heads(model, tokens.repeat(2, 1), scores=["induction"], cache=cache, progress=False)
    _, partial = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_z"))
    with pytest.raises(ValueError, match="the cache has no"):
        score_heads(model, tokens, scores=["induction"], cache=partial, progress=False)
    with pytest.raises(ValueError, match="exclude each other"):
        score_heads(model, tokens, cache=cache, query_chunk=2, progress=False)
