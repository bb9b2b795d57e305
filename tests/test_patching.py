"""Activation patching (``method="patch"``, ``patch_heads_by_pos``) against TransformerLens's own.

The reference is ``transformer_lens.patching.get_act_patch_attn_head_out_all_pos`` / ``_by_pos`` on the
same model, with a ``patching_metric`` that is lens-attn's per-prompt metric averaged over the batch.
Both patch ``hook_z`` (per query head, also under GQA) and run the same forward, so they agree to
float32 rounding of a loss of a few nats: 1e-5 leaves room for summation order only.
"""

import pytest
import torch
from transformer_lens import patching

from lens_attn.ablation.methods import ablate
from lens_attn.ablation.metrics import per_prompt
from lens_attn.ablation.patching import patch_heads_by_pos
from lens_attn.ablation.sweep import ablation_sweep
from lens_attn.loading import load_model

ATOL = 1e-5


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    return {kind: load_model(ckpt.path, device="cpu") for kind, ckpt in tiny_checkpoints.items()}


def _pair(model, n_pos: int = 7, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and corrupted tokens of the same shape, BOS first, differing at a few positions."""
    g = torch.Generator().manual_seed(5)
    clean = torch.randint(3, model.cfg.d_vocab, (batch, n_pos), generator=g)
    clean[:, 0] = 1
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(3, model.cfg.d_vocab, (batch,), generator=g)
    corrupted[:, 4] = torch.randint(3, model.cfg.d_vocab, (batch,), generator=g)
    return clean, corrupted


def _tl_metric(tokens):
    return lambda logits: per_prompt("loss", logits, tokens.to(logits.device)).mean()


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_patch_sweep_equals_transformer_lens_all_pos(models, kind):
    model = models[kind]
    clean, corrupted = _pair(model)
    _, clean_cache = model.run_with_cache(clean)
    expected = patching.get_act_patch_attn_head_out_all_pos(
        model, corrupted, clean_cache, _tl_metric(corrupted)
    )  # [layer, head_index]
    result = ablation_sweep(model, corrupted, method="patch", reference=clean, metric="loss")
    ours = result.ablated.reshape(model.cfg.n_layers, model.cfg.n_heads)
    torch.testing.assert_close(ours, expected.float().cpu(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_patch_sweep_fast_paths_equal_the_full_run(models, kind):
    model = models[kind]
    clean, corrupted = _pair(model)
    kwargs = dict(method="patch", reference=clean, metric="loss", heads=["L0H1", "L1", "L1H2"])
    fast = ablation_sweep(model, corrupted, **kwargs)
    full = ablation_sweep(model, corrupted, reuse_prefix=False, **kwargs)
    assert full.provenance["path"] == "full"
    torch.testing.assert_close(fast.ablated, full.ablated, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_patch_by_pos_equals_transformer_lens(models, kind):
    model = models[kind]
    clean, corrupted = _pair(model, n_pos=6)
    _, clean_cache = model.run_with_cache(clean)
    expected = patching.get_act_patch_attn_head_out_by_pos(
        model, corrupted, clean_cache, _tl_metric(corrupted)
    )  # [layer, pos, head_index]
    result = patch_heads_by_pos(model, corrupted, clean, metric="loss", max_batch=8)
    assert result.values.shape == expected.shape
    torch.testing.assert_close(result.values, expected.float().cpu(), atol=ATOL, rtol=0)
    # patching a position where clean and corrupted agree, before any difference, changes nothing
    torch.testing.assert_close(
        result.delta[:, :2], torch.zeros_like(result.delta[:, :2]), atol=ATOL, rtol=0
    )
    frame = result.to_dataframe()
    assert len(frame) == result.values.numel() and list(frame.columns[:4]) == [
        "unit", "layer", "pos", "head",
    ]  # fmt: skip


def test_patching_from_itself_changes_nothing(models):
    model = models["gqa"]
    _, corrupted = _pair(model)
    result = ablation_sweep(model, corrupted, method="patch", reference=corrupted, metric="loss")
    torch.testing.assert_close(result.delta, torch.zeros_like(result.delta), atol=ATOL, rtol=0)


def test_ablate_patch_context_manager_equals_the_sweep(models):
    model = models["gqa"]
    clean, corrupted = _pair(model)
    with ablate(model, ["L1H4"], method="patch", reference=clean):
        logits = model(corrupted)
    value = per_prompt("loss", logits, corrupted).mean()
    swept = ablation_sweep(model, corrupted, method="patch", reference=clean, heads=["L1H4"])
    torch.testing.assert_close(swept.ablated[0], value.float(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("what", ["count", "length"])
def test_reference_of_another_shape_is_refused(models, what):
    model = models["gqa"]
    clean, corrupted = _pair(model)
    reference = clean[:1] if what == "count" else clean[:, :-1]
    with pytest.raises(ValueError, match="method='patch' runs input row i"):
        ablation_sweep(model, corrupted, method="patch", reference=reference)
    with pytest.raises(ValueError, match="method='patch' runs input row i"):
        patch_heads_by_pos(model, corrupted, reference)
    with pytest.raises(ValueError, match="method='patch' needs reference|needs reference"):
        ablation_sweep(model, corrupted, method="patch")


def test_patching_on_a_bridge_equals_transformer_lens(tiny_checkpoints):
    # on TransformerLens 3.9 the fixtures above are HookedTransformers; the bridge runs every pass
    # in full there (no start_at_layer), on 4.x from the patched layer
    model = load_model(tiny_checkpoints["gqa"].path, backend="bridge", device="cpu")
    clean, corrupted = _pair(model, n_pos=5)
    _, clean_cache = model.run_with_cache(clean)
    metric = _tl_metric(corrupted)
    expected = patching.get_act_patch_attn_head_out_by_pos(model, corrupted, clean_cache, metric)
    ours = patch_heads_by_pos(model, corrupted, clean, metric="loss", max_batch=12).values
    torch.testing.assert_close(ours, expected.float().cpu(), atol=ATOL, rtol=0)
    expected = patching.get_act_patch_attn_head_out_all_pos(model, corrupted, clean_cache, metric)
    result = ablation_sweep(model, corrupted, method="patch", reference=clean, metric="loss")
    ours = result.ablated.reshape(model.cfg.n_layers, model.cfg.n_heads)
    torch.testing.assert_close(ours, expected.float().cpu(), atol=ATOL, rtol=0)
