"""Query-chunked scoring (``score_heads(..., query_chunk=C)``) against the full-pattern path.

The reference is the same model's normal forward, where TransformerLens builds every layer's
``[batch, head_index, T, T]`` pattern. The chunked path computes the same softmax rows from
``hook_rot_q``/``hook_rot_k`` a block of rows at a time, so scores, standard errors and logits must
agree to float32 rounding (a few 1e-7 on 0..1 quantities after summing over at most 64 keys):
1e-5 leaves room for summation order only. ``mean_distance`` is in tokens (up to ~60), so it is
compared with a relative tolerance of 1e-6 on top.
"""

import pytest
import torch
from transformer_lens.utilities import get_act_name

from lens_attn.compat import HAS_HOOKED, HookedTransformer, HookedTransformerConfig
from lens_attn.errors import LensAttnError
from lens_attn.loading import load_model
from lens_attn.probes import Probe, induction_probes, repeated_token_probes
from lens_attn.scoring import chunked
from lens_attn.scoring.builtin import BUILTIN_SCORES
from lens_attn.scoring.protocol import DetectionPattern, PromptRatio, RatioAnalysis
from lens_attn.scoring.registry import registered
from lens_attn.scoring.runner import score_heads

PATTERN_SCORES = [  # the built-in pattern scores that run chunked (not name_mover, retrieval)
    name
    for name in BUILTIN_SCORES
    if registered()[name].hooks == ("pattern",) and registered()[name].chunkable
]
CHUNKS = [1, 7, "T"]  # "T": one block holding every row, resolved per test
NATURAL = [
    "the cat sat on the mat",
    "When Mary and John went to the store, John gave a drink to Mary because she was thirsty",
    "one two three four one two three four",
]


@pytest.fixture(scope="module", params=["hooked", "bridge"])
def models(request, tiny_checkpoints):
    """The tiny checkpoints as a HookedTransformer (3.9 only) or a TransformerBridge (both)."""
    if request.param == "hooked" and not HAS_HOOKED:
        pytest.skip("needs HookedTransformer, which TransformerLens 4 removed")
    return {
        kind: load_model(ckpt.path, backend=request.param, device="cpu")
        for kind, ckpt in tiny_checkpoints.items()
    }


def _probes(model) -> list[Probe]:
    """Repeated random tokens (induction) and tokens drawn from a small pool (duplicates), of
    lengths 11, 23 and 16: one right-padded batch."""
    return induction_probes(model, periods=(5, 11), n_per_period=2, seed=3) + repeated_token_probes(
        model, n=2, length=16, seed=3
    )


def _assert_same_scores(chunked_scores, full_scores):
    for name in full_scores.names:
        for field in ("values", "stderr"):
            ours = getattr(chunked_scores, field)[name]
            reference = getattr(full_scores, field)[name]
            torch.testing.assert_close(
                ours, reference, atol=1e-5, rtol=1e-6, equal_nan=True, msg=f"{name} {field}"
            )


def _chunk(chunk, longest: int) -> int:
    return longest if chunk == "T" else chunk


@pytest.mark.parametrize("chunk", CHUNKS, ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_scores_equal_full_pattern(models, kind, chunk):
    model = models[kind]
    probes = _probes(model)
    query_chunk = _chunk(chunk, max(len(p.tokens) for p in probes))
    full = score_heads(model, probes, scores=PATTERN_SCORES, progress=False)
    ours = score_heads(
        model, probes, scores=PATTERN_SCORES, query_chunk=query_chunk, progress=False
    )
    assert ours.names == full.names
    _assert_same_scores(ours, full)
    for name in full.names:  # the number of prompts each score counted is the same, exactly
        assert torch.equal(ours.counts[name].nan_to_num(-1), full.counts[name].nan_to_num(-1))
    assert ours.provenance["query_chunk"] == query_chunk


@pytest.mark.parametrize(
    ("chunk", "normalize"),
    [(1, "target_rows"), (5, "target_rows"), (5, "all_rows"), ("T", "all_rows")],
    ids=["chunk1-target_rows", "chunk5-target_rows", "chunk5-all_rows", "chunkT-all_rows"],
)
def test_padded_batches_of_different_lengths(models, chunk, normalize):
    # natural prompts of 5..20 tokens, two per batch: padding in every batch, T varies by batch
    model = models["gqa"]
    longest = max(model.to_tokens(p).shape[1] for p in NATURAL)
    query_chunk = _chunk(chunk, longest)
    # a user detection pattern (chunkable), with the "abs" measure that sums |pattern - target|
    below_diagonal = lambda t: torch.diag(torch.ones(len(t) - 1), -1)  # noqa: E731
    previous = DetectionPattern("prev_abs", below_diagonal, measure="abs")
    scores = [*PATTERN_SCORES, previous]
    kwargs = dict(scores=scores, batch_size=2, normalize=normalize, progress=False)
    full = score_heads(model, NATURAL, **kwargs)
    ours = score_heads(model, NATURAL, query_chunk=query_chunk, **kwargs)
    _assert_same_scores(ours, full)


def test_analyses_on_other_hooks_still_run(models):
    # hook_z fires in the chunked forward too; z is computed from the same pattern blocks
    model = models["gqa"]

    def z_norm(layer, acts, batch):
        norm = acts["z"].float().norm(dim=-1)  # [batch, pos, head_index]
        rows = batch.mask.float()
        return PromptRatio((norm * rows[:, :, None]).sum(1), rows.sum(1)[:, None])

    analysis = RatioAnalysis("z_norm", z_norm, ("z",))
    probes = _probes(model)
    full = score_heads(model, probes, scores=[analysis, "induction"], progress=False)
    ours = score_heads(model, probes, scores=[analysis, "induction"], query_chunk=4, progress=False)
    _assert_same_scores(ours, full)


@pytest.mark.parametrize("chunk", CHUNKS, ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_logits_equal_normal_forward(models, kind, chunk):
    model = models[kind]
    tokens = torch.randint(3, model.cfg.d_vocab, (2, 19))
    reference = model(tokens, return_type="logits")
    with chunked.chunked_attention(model, _chunk(chunk, 19), lambda layer, blocks: None):
        logits = model(tokens, return_type="logits")
    # logits are O(10): 1e-5 absolute is float32 rounding through 2-3 layers
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_logits_equal_with_left_padding_mask(models, kind):
    # an attention_mask (left padding) changes the rotary positions and hides keys: same in both
    model = models[kind]
    tokens = torch.randint(3, model.cfg.d_vocab, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    reference = model(tokens, attention_mask=mask, return_type="logits")
    with chunked.chunked_attention(model, 5, lambda layer, blocks: None):
        logits = model(tokens, attention_mask=mask, return_type="logits")
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-6)


def _replaced(model) -> list[int]:
    return [layer for layer, block in enumerate(model.blocks) if "forward" in vars(block.attn)]


def test_forward_restored_after_exit_and_after_errors(models):
    model = models["gqa"]
    tokens = torch.randint(3, model.cfg.d_vocab, (1, 9))
    reference = model(tokens, return_type="logits")
    with chunked.chunked_attention(model, 3, lambda layer, blocks: None):
        assert _replaced(model) == [0, 1, 2]
    assert _replaced(model) == []

    with pytest.raises(RuntimeError, match="in the body"):
        with chunked.chunked_attention(model, 3, lambda layer, blocks: None):
            raise RuntimeError("in the body")
    assert _replaced(model) == []

    def failing_consumer(layer, blocks):
        next(blocks)
        raise RuntimeError("in the consumer")

    with pytest.raises(RuntimeError, match="in the consumer"):
        with chunked.chunked_attention(model, 3, failing_consumer):
            model(tokens)
    assert _replaced(model) == []

    def failing_analysis(layer, acts, batch):
        raise RuntimeError("in an analysis")

    broken = RatioAnalysis("broken", failing_analysis, ("pattern",), chunkable=True)
    with pytest.raises(RuntimeError, match="in an analysis"):
        score_heads(model, tokens, scores=[broken], query_chunk=3, progress=False)
    assert _replaced(model) == []
    torch.testing.assert_close(model(tokens, return_type="logits"), reference, atol=0, rtol=0)


def test_nested_chunking_refused(models):
    model = models["gqa"]
    with chunked.chunked_attention(model, 3, lambda layer, blocks: None):
        with pytest.raises(ValueError, match="already replaced"):
            with chunked.chunked_attention(model, 3, lambda layer, blocks: None):
                pass
        assert _replaced(model) == [0, 1, 2]  # the refused inner call restored nothing of ours
    assert _replaced(model) == []


@pytest.mark.parametrize("hook", ["pattern", "attn_scores"])
def test_hooks_on_the_full_pattern_refused(models, hook):
    model = models["gqa"]
    name = get_act_name(hook, 1)
    with model.hooks(fwd_hooks=[(name, lambda act, hook: None)]):
        with pytest.raises(ValueError, match=rf"{name} has hooks attached.*never built"):
            score_heads(model, _probes(model), scores=["induction"], query_chunk=4, progress=False)
    assert _replaced(model) == []


@pytest.mark.parametrize("bad", [0, -1, 24, True], ids=repr)  # non-ints: a type error
def test_bad_chunk_size_refused(models, bad):
    model = models["gqa"]
    probes = _probes(model)  # longest prompt: 23 tokens
    with pytest.raises(ValueError, match=r"query_chunk must be an integer from 1 to .* T=23"):
        score_heads(model, probes, scores=["induction"], query_chunk=bad, progress=False)


def test_prompt_longer_than_context_refused(models):
    model = models["gqa"]
    too_long = Probe("prompt", torch.randint(3, model.cfg.d_vocab, (model.cfg.n_ctx + 1,)))
    with pytest.raises(ValueError, match=r"65 tokens .* n_ctx=64"):
        score_heads(model, [too_long], scores=["induction"], query_chunk=8, progress=False)


def test_non_chunkable_analyses_refused(models):
    model = models["gqa"]

    def rows_seen(layer, acts, batch):  # written for whole patterns (chunkable defaults to False)
        p = acts["pattern"]
        return PromptRatio(p.sum((-1, -2)), torch.ones(p.shape[0], 1))

    whole = RatioAnalysis("rows_seen", rows_seen, ("pattern",))
    with pytest.raises(ValueError, match=r"analysis 'rows_seen' can't run with query_chunk"):
        score_heads(model, _probes(model), scores=[whole], query_chunk=4, progress=False)
    # chunkable, but also reads another hook: the block would not line up with it
    mixed = RatioAnalysis("pattern_and_z", rows_seen, ("pattern", "z"), chunkable=True)
    with pytest.raises(ValueError, match=r"'pattern_and_z'.*read only 'pattern'"):
        score_heads(model, _probes(model), scores=[mixed], query_chunk=4, progress=False)


def test_only_transformer_lens_models_chunk():
    with pytest.raises(LensAttnError, match="neither a HookedTransformer nor a TransformerBridge"):
        with chunked.chunked_attention(object(), 2, lambda layer, blocks: None):
            pass


def test_a_bridge_it_cannot_recompute_is_refused_in_one_line(tiny_checkpoints, monkeypatch):
    bridge = load_model(tiny_checkpoints["gqa"].path, backend="bridge", device="cpu")
    hf_attention = bridge.blocks[0].attn.original_component
    monkeypatch.setattr(hf_attention, "attn_logit_softcapping", 30.0, raising=False)
    with pytest.raises(LensAttnError, match="query_chunk recomputes .* soft-capped") as err:
        score_heads(bridge, ["one two three one two three"], query_chunk=2, progress=False)
    assert "\n" not in str(err.value)


@pytest.mark.hooked_only
def test_gradients_equal_normal_forward():
    # the in-place steps of the chunked forward must leave autograd intact (softmax keeps its
    # output for the backward pass); a fresh model, since the shared fixtures are frozen
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=24, n_ctx=32, d_head=4, n_heads=6, n_key_value_heads=2, d_mlp=36,
        d_vocab=50, act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
        rotary_dim=4, gated_mlp=True, seed=0,
    )  # fmt: skip
    model = HookedTransformer(cfg)
    tokens = torch.randint(0, 50, (2, 9))
    weight = model.blocks[0].attn.W_Q
    reference = torch.autograd.grad(model(tokens, return_type="loss"), weight)[0]
    with chunked.chunked_attention(model, 4, lambda layer, blocks: None):
        grad = torch.autograd.grad(model(tokens, return_type="loss"), weight)[0]
    torch.testing.assert_close(grad, reference, atol=1e-6, rtol=1e-5)
