"""Tokenizers that are not Llama 2's: BOS only where asked, and no special token in a random probe.

References: TransformerLens's ``detect_head`` (which tokenizes with the model's own
``default_prepend_bos``), and sets of special ids read directly from the tokenizer.
"""

from types import SimpleNamespace

import checkpoints
import pytest
import torch
from transformer_lens.head_detector import detect_head
from transformers import AutoTokenizer

from lens_attn.loading import BUNDLED_CHECKPOINT, load_model
from lens_attn.patterns import capture_patterns
from lens_attn.probes import (
    induction_probes,
    prompt_probes,
    repeated_token_probes,
)
from lens_attn.runs import run_info
from lens_attn.scoring.runner import score_heads

PROMPT = " seven token sequence seven token sequence"


@pytest.fixture(scope="module")
def no_bos_models(tiny_checkpoints):
    path = tiny_checkpoints["gqa"].path
    return {
        backend: load_model(path, backend=backend, device="cpu", default_prepend_bos=False)
        for backend in checkpoints.AVAILABLE_BACKENDS
    }


@pytest.mark.parametrize("backend", checkpoints.BACKENDS)
def test_string_prompts_follow_default_prepend_bos(no_bos_models, tiny_model, backend):
    model = no_bos_models[backend]
    expected = tiny_model.tokenizer(PROMPT, add_special_tokens=False).input_ids
    assert prompt_probes(model, [PROMPT])[0].tokens.tolist() == expected
    assert prompt_probes(tiny_model, [PROMPT])[0].tokens.tolist() == [1, *expected]
    patterns = capture_patterns(model, PROMPT)
    assert patterns.tokens.shape[-1] == len(expected)


@pytest.mark.skipif(
    not (BUNDLED_CHECKPOINT / "model.safetensors").exists(), reason="bundled checkpoint not built"
)
def test_bundled_without_bos_scores_as_detect_head():
    # The case: on the bundled model loaded without BOS, score_heads prepended BOS anyway
    # (induction 0.27 where detect_head gives 0.42). One prompt, all rows: the same quantity.
    model = load_model(device="cpu", default_prepend_bos=False)
    ours = score_heads(model, [PROMPT], scores=["induction"], normalize="all_rows", progress=False)
    reference = detect_head(model, PROMPT, "induction_head", error_measure="mul")
    # float32 sums over at most 10x10 weights: 1e-5 leaves room for summation order only
    torch.testing.assert_close(ours["induction"], reference.float(), atol=1e-5, rtol=0)
    assert reference.max() > 0.4


def test_bos_score_defaults_are_unchanged(tiny_model):
    # with default_prepend_bos left alone (True), prompts still start with BOS
    assert tiny_model.to_tokens(PROMPT)[0, 0] == 1
    assert prompt_probes(tiny_model, [PROMPT])[0].tokens[0] == 1


@pytest.fixture(scope="module")
def odd_special_model(tiny_tokenizer_dir):
    """A model stand-in whose special tokens are not a prefix of the vocabulary.

    The tiny tokenizer (specials 0, 1, 2) plus two added special tokens (ids 400, 401) and one
    added ordinary token (402), with an embedding padded to 410 rows (ids 403-409 have no token).
    """
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|a|>", "<|b|>"]})
    tokenizer.add_tokens(["plainword"])
    cfg = SimpleNamespace(d_vocab=410, n_ctx=128, default_prepend_bos=True)
    return SimpleNamespace(cfg=cfg, tokenizer=tokenizer)


def test_random_probes_never_draw_special_tokens(odd_special_model):
    tokenizer = odd_special_model.tokenizer
    specials = set(tokenizer.all_special_ids) | {
        i for i, t in tokenizer.added_tokens_decoder.items() if t.special
    }
    assert {0, 1, 2, 400, 401} <= specials and 402 not in specials
    probes = induction_probes(odd_special_model, n_per_period=64) + repeated_token_probes(
        odd_special_model, n=64
    )
    drawn = torch.cat([p.tokens[1:] for p in probes])
    assert not set(drawn.tolist()) & specials
    assert drawn.max() <= 402  # no id without a token
    assert 402 in set(drawn.tolist())  # an added ordinary token may be drawn
    assert all(p.tokens[0] == tokenizer.bos_token_id for p in probes)


def test_llama_2_draws_are_unchanged(tiny_model):
    # For Llama 2's specials (0, 1, 2) the draws are exactly the former randint(3, d_vocab) ones,
    # so probe sets (and their hashes in earlier runs) do not move.
    probes = induction_probes(tiny_model, periods=(23,), n_per_period=4, seed=0)
    g = torch.Generator().manual_seed(23)
    expected = torch.randint(3, tiny_model.cfg.d_vocab, (4, 23), generator=g)
    for probe, row in zip(probes, expected, strict=True):
        assert probe.tokens.tolist() == [1, *row.tolist(), *row.tolist()]


def test_run_json_records_bos(no_bos_models, tiny_model):
    info = run_info(no_bos_models["bridge"], "x", {})
    assert info["tokenizer"] == {
        "bos_token": "<s>",
        "bos_token_id": 1,
        "prompts_prepend_bos": False,
    }
    assert run_info(tiny_model, "x", {})["tokenizer"]["prompts_prepend_bos"] is True
