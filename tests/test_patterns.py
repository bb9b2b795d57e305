"""capture_patterns: invariants of attention patterns, padding, and bad input."""

import pytest
import torch
from transformer_lens.utilities import get_act_name

from lens_attn.patterns import capture_patterns

PROMPTS = ["The capital of France is", "a", "one two three four five six seven eight nine ten"]


def test_every_layer_is_captured_with_shapes(tiny_model):
    patterns = capture_patterns(tiny_model, PROMPTS)
    n_layers, n_heads = tiny_model.cfg.n_layers, tiny_model.cfg.n_heads
    longest = max(len(t) for t in patterns.str_tokens)
    assert patterns.layers == list(range(n_layers))
    assert patterns.pattern.shape == (n_layers, len(PROMPTS), n_heads, longest, longest)
    assert patterns.str_tokens[1][0] == "<s>" and len(patterns.str_tokens[1]) == 2
    assert patterns.to_numpy().shape == tuple(patterns.pattern.shape)


def test_rows_sum_to_one_over_real_keys_and_upper_triangle_is_zero(tiny_model):
    patterns = capture_patterns(tiny_model, PROMPTS)
    for b in range(len(PROMPTS)):
        for layer in patterns.layers:
            p = patterns.layer(layer, b)  # [head_index, query_pos, key_pos], real tokens only
            torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:2]), atol=1e-5, rtol=0)
            assert torch.triu(p, diagonal=1).abs().max() == 0
    # padded query rows are zero
    n = len(patterns.str_tokens[1])
    assert patterns.pattern[:, 1, :, n:].abs().max() == 0


def test_padded_batch_equals_each_prompt_alone(tiny_model):
    together = capture_patterns(tiny_model, PROMPTS)
    for b, prompt in enumerate(PROMPTS):
        alone = capture_patterns(tiny_model, [prompt])
        for layer in together.layers:
            # same maths on the same rows; batching changes only float summation order
            torch.testing.assert_close(
                together.layer(layer, b), alone.layer(layer, 0), atol=1e-6, rtol=0
            )


def test_matches_run_with_cache_and_mean_over_heads(tiny_model):
    patterns = capture_patterns(tiny_model, PROMPTS[0], layers=[1])
    _, cache = tiny_model.run_with_cache(PROMPTS[0])
    reference = cache[get_act_name("pattern", 1)][0]
    torch.testing.assert_close(patterns.layer(1), reference)
    torch.testing.assert_close(patterns.head(1, 2), reference[2])
    torch.testing.assert_close(patterns.mean_over_heads(1), reference.mean(0))


@pytest.mark.parametrize(
    "kwargs, call, message",
    [
        ({"prompts": [""]}, None, "prompt 0 is empty"),
        ({"prompts": []}, None, "prompt list is empty"),
        ({"prompts": ["word " * 200]}, None, "context is n_ctx=64"),
        (
            {"prompts": ["a"], "layers": [5]},
            None,
            r"layer\(s\) \[5\] out of range; this model has layers 0..2",
        ),
        ({"prompts": ["a"]}, lambda p: p.head(0, 9), "head 9 out of range; valid: 0..5"),
        ({"prompts": ["a"], "layers": [0]}, lambda p: p.head(2, 0), "layer 2 was not captured"),
    ],
    ids=["empty-prompt", "no-prompts", "too-long", "layer", "head", "layer-not-captured"],
)
def test_bad_input(tiny_model, kwargs, call, message):
    with pytest.raises(ValueError, match=message):
        patterns = capture_patterns(tiny_model, kwargs.pop("prompts"), **kwargs)
        call(patterns)
