"""The unhooked replay (``lens_attn.ablation.replay``) against TransformerLens's own blocks, on a
``HookedTransformer`` (3.9) and a ``TransformerBridge`` (both versions), MHA and GQA.

Reference: ``run_with_cache`` on the same right-padded batch; the replay must reproduce
``blocks.{last}.hook_resid_post`` at every real position, from every layer and both start sites.
"""

import pytest
import torch

from lens_attn.ablation import replay
from lens_attn.blocks import block_view
from lens_attn.compat import HAS_HOOKED, is_hooked
from lens_attn.probes import induction_probes, pad

KINDS = [("hooked", "mha"), ("hooked", "gqa"), ("bridge", "mha"), ("bridge", "gqa")]


@pytest.fixture(scope="module", params=KINDS, ids=["-".join(k) for k in KINDS])
def model(request, tiny_checkpoints):
    from lens_attn.loading import load_model

    backend, kind = request.param
    if backend == "hooked" and not HAS_HOOKED:
        pytest.skip("needs HookedTransformer, which TransformerLens 4 removed")
    return load_model(tiny_checkpoints[kind].path, backend=backend, device="cpu")


def _batch(model):
    # lengths 11 and 15, right-padded: padding is exercised
    tokens, mask = pad(induction_probes(model, periods=(5, 7), n_per_period=2, seed=1))
    return tokens, mask


@pytest.mark.parametrize("at", ["resid_pre", "resid_mid"])
@pytest.mark.parametrize("query_from", [0, 6])
def test_run_from_equals_the_model(model, at, query_from):
    tokens, mask = _batch(model)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask.long())
        expected = cache["resid_post", model.cfg.n_layers - 1][:, query_from:]
        real = mask[:, query_from:, None]
        for layer in range(model.cfg.n_layers):
            got = replay.run_from(model, cache[at, layer], layer, at=at, query_from=query_from)
            assert got.shape == expected.shape
            # 1e-5 relative to the residual's scale: the fused kernel sums in another order
            scale = float(expected.abs().max())
            err = float(((got - expected).abs() * real).max())
            assert err <= 1e-5 * scale, (layer, err, scale)


@pytest.mark.parametrize("query_from", [0, 6])
def test_edited_z_in_later_layers_equals_a_hook_on_hook_z(model, query_from):
    """Reference: TransformerLens's own run with hooks writing the same z on ``hook_z``."""
    tokens, mask = _batch(model)
    last = model.cfg.n_layers - 1

    # head 1 of every later layer (the last one included) set to a constant, head 0 zeroed
    def edit(z):
        z = z.clone()
        z[:, :, 0] = 0.0
        z[:, :, 1] = 0.5
        return z

    hooks = [(f"blocks.{i}.attn.hook_z", lambda z, hook: edit(z)) for i in range(1, last + 1)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask.long())
        kept = {}  # the final residual stream (a bridge's stop_at_layer still returns logits)
        keep = (f"blocks.{last}.hook_resid_post", lambda x, hook: kept.setdefault("x", x))
        model.run_with_hooks(tokens, attention_mask=mask.long(), fwd_hooks=[*hooks, keep])
        edited = kept["x"][:, query_from:]
        got = replay.run_from(
            model,
            cache["resid_mid", 0],
            0,
            at="resid_mid",
            query_from=query_from,
            edit_z=dict.fromkeys(range(1, last + 1), edit),
        )
    real = mask[:, query_from:, None]
    scale = float(edited.abs().max())
    assert float(((got - edited).abs() * real).max()) <= 1e-5 * scale
    clean = cache["resid_post", last][:, query_from:]
    assert float(((got - clean).abs() * real).max()) > 1e-3 * scale  # the edit does something
    with pytest.raises(ValueError, match="edit_z has layers"):
        replay.run_from(model, cache["resid_mid", 0], 0, at="resid_mid", edit_z={0: edit})


def test_mlp_and_unembed_equal_transformer_lens_modules(model):
    x = torch.randn(2, 5, model.cfg.d_model)
    with torch.no_grad():
        for layer, block in enumerate(model.blocks):
            torch.testing.assert_close(block_view(model, layer).mlp(x), block.mlp(x))
        torch.testing.assert_close(replay.unembed(model, x), model.unembed(x))


def test_attention_of_a_query_subset_equals_the_full_causal_run(model):
    tokens, mask = _batch(model)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask.long())
        view = block_view(model, 1)
        x = view.ln1(cache["resid_pre", 1])
        full = replay.attention(view, x)
        part = replay.attention(view, x, query_from=4)
    torch.testing.assert_close(
        full, cache["attn_out", 1] * mask[..., None] + full * ~mask[..., None]
    )
    torch.testing.assert_close(part, full[:, 4:], atol=1e-6, rtol=0)


def test_what_it_refuses(model):
    tokens, mask = _batch(model)
    with torch.no_grad():
        resid = model(tokens, stop_at_layer=1)
    hook = model.hook_dict["blocks.1.attn.hook_z"]
    hook.add_hook(lambda act, hook: act)
    try:
        assert replay.has_hooks(model)
        with pytest.raises(ValueError, match="hooks attached"):
            replay.run_from(model, resid, 1)
    finally:
        model.reset_hooks()
    # under the suite's runtime type checking the Literal annotation refuses it first (TypeError)
    with pytest.raises((ValueError, TypeError), match="resid_post"):
        replay.run_from(model, resid, 1, at="resid_post")
    assert replay.is_right_padded(mask)
    assert not replay.is_right_padded(mask.flip(1))


def test_unsupported_blocks_are_refused(model, monkeypatch):
    assert replay.supports_replay(model)
    assert replay.replay_blocker(model) is None
    if is_hooked(model):
        monkeypatch.setattr(model.cfg, "attn_scores_soft_cap", 30.0)  # Gemma 2's capped scores
        reason = "soft-capped"
    else:
        hf_attention = model.blocks[1].attn.original_component
        monkeypatch.setattr(hf_attention, "attn_logit_softcapping", 30.0, raising=False)
        reason = "blocks.1.attn has soft-capped scores"
    assert not replay.supports_replay(model)
    assert reason in replay.replay_blocker(model)
    with pytest.raises(ValueError, match=reason):
        replay.run_from(model, torch.zeros(1, 3, model.cfg.d_model), 0)
