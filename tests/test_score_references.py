"""The fused built-in scores against their one-score-at-a-time references (``score_references.py``).

Both run in the same ``score_heads`` pass over the same batches, so they see the same patterns; they
differ only in how the sums are ordered. Scores in 0..1 are float32 sums over at most ~40 rows of
at most ~40 keys: 1e-6 absolute leaves room for summation order only. ``mean_distance`` is in tokens
(up to ~40), where a float32 ulp is ~4e-6, so it also gets a relative tolerance of 1e-6.
"""

import pytest
import torch
from score_references import reference_analyses

from lens_attn.loading import load_model
from lens_attn.probes import Probe, induction_probes, repeated_token_probes
from lens_attn.scoring.builtin import BUILTIN_SCORES
from lens_attn.scoring.protocol import PromptRatio
from lens_attn.scoring.registry import registered
from lens_attn.scoring.runner import score_heads

NATURAL = [
    "the cat sat on the mat and the cat sat on the mat",
    "When Mary and John went to the store, John gave a drink to Mary because she was thirsty",
    "one two three four one two three four five",
    "a",  # a one-token prompt: no row with a choice
]


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    return {kind: load_model(ckpt.path, device="cpu") for kind, ckpt in tiny_checkpoints.items()}


def _probes(model) -> list[Probe]:
    natural = [Probe("natural", model.to_tokens(p)[0]) for p in NATURAL]
    return (
        induction_probes(model, periods=(5, 11), n_per_period=2, seed=3)
        + repeated_token_probes(model, n=2, length=16, seed=3)
        + natural
    )


def _assert_matches_reference(scores, names):
    for name in names:
        for field in ("values", "stderr", "counts"):
            ours, reference = getattr(scores, field)[name], getattr(scores, field)[f"ref_{name}"]
            torch.testing.assert_close(
                ours,
                reference,
                atol=1e-6,
                rtol=1e-6 if name == "mean_distance" else 0,
                equal_nan=True,
                msg=f"{name} {field}",
            )


def _chunkable(name: str) -> bool:
    analysis = registered()[name]
    return not analysis.hooks or (analysis.chunkable and analysis.hooks == ("pattern",))


@pytest.mark.parametrize(
    "query_chunk",
    [None, *(pytest.param(c, marks=pytest.mark.hooked_only) for c in (1, 7))],  # HT only
    ids=lambda c: f"chunk{c}",
)
@pytest.mark.parametrize("normalize", ["target_rows", "all_rows"])
@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_every_builtin_equals_its_reference(models, kind, normalize, query_chunk):
    model = models[kind]
    chunkable = [a for a in reference_analyses() if a.hooks or query_chunk is None]
    scores = score_heads(
        model,
        _probes(model),
        scores=[*(n for n in BUILTIN_SCORES if query_chunk is None or _chunkable(n)), *chunkable],
        batch_size=5,  # mixed lengths in every batch: right padding everywhere
        normalize=normalize,
        query_chunk=query_chunk,
        progress=False,
    )
    names = [n for n in scores.names if not n.startswith("ref_")]
    if query_chunk is not None:  # name_mover and retrieval don't run on blocks of query rows
        names += ["name_mover", "negative_name_mover", "retrieval"]
    assert names == BUILTIN_SCORES[:9] + [
        "offset", "offset_share", "previous_n", "previous_n_offset",
        "copying", "copy_rank", "suppress_rank", "successor",
        "name_mover", "negative_name_mover", "retrieval",
    ]  # fmt: skip
    _assert_matches_reference(scores, [n for n in names if f"ref_{n}" in scores.names])


@pytest.mark.parametrize(
    "subset",
    [["induction"], ["offset"], ["entropy", "bos"], ["sparsity", "confidence", "previous_token"]],
    ids=lambda s: "+".join(s),
)
def test_a_subset_of_builtins_equals_its_reference(models, subset):
    model = models["gqa"]
    refs = [a for a in reference_analyses() if a.name.removeprefix("ref_") in subset]
    scores = score_heads(
        model, _probes(model), scores=[*subset, *refs], batch_size=4, progress=False
    )
    _assert_matches_reference(scores, [n for n in scores.names if f"ref_{n}" in scores.names])


def test_unfused_custom_analysis_runs_in_the_same_pass(models):
    model = models["mha"]
    seen_layers = []

    def last_key(layer, acts, batch):
        seen_layers.append(layer)
        p = acts["pattern"]
        rows = batch.mask.float()
        return PromptRatio((p[..., -1] * rows[:, None]).sum(-1), rows.sum(-1)[:, None])

    from lens_attn.scoring.protocol import RatioAnalysis

    custom = RatioAnalysis("test_last_key", last_key, ("pattern", "z"))
    forward_passes = []
    embed_hook = ("hook_embed", lambda act, hook: forward_passes.append(1))
    with model.hooks(fwd_hooks=[embed_hook]):
        scores = score_heads(
            model, NATURAL[:3], scores=["induction", custom], batch_size=8, progress=False
        )
    assert len(forward_passes) == 1
    assert seen_layers == list(range(model.cfg.n_layers))
    assert scores.names == ["induction", "test_last_key"]


# a TransformerBridge stops at a block, so stop_at_layer=n_layers still runs ln_final and unembed
@pytest.mark.hooked_only
def test_scoring_stops_after_the_last_layer_it_reads(models):
    model = models["gqa"]
    fired = []
    final_hook = ("ln_final.hook_normalized", lambda act, hook: fired.append(1))
    with model.hooks(fwd_hooks=[final_hook]):
        score_heads(model, NATURAL[:2], progress=False)
        assert fired == []  # no final norm, no unembedding: scores read no logits
        model(model.to_tokens(NATURAL[0]), return_type=None)
        assert fired == [1]


def test_fused_pass_runs_once_per_layer_and_batch(models, monkeypatch):
    from lens_attn.scoring import fused

    calls = []
    real = fused.fused_pass
    monkeypatch.setattr(fused, "fused_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = models["gqa"]
    score_heads(model, NATURAL[:3], batch_size=2, progress=False)  # two batches
    assert len(calls) == 2 * model.cfg.n_layers
