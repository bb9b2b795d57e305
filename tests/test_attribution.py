"""Attribution patching (``lens_attn.ablation.attribution``) against finite differences and the sweep.

The independent reference for the gradient estimate is a central finite difference of the metric
along the same straight line the estimate linearises: ``z_head -> z_head + t * (z_ablated -
z_head)``, run in float64 so the difference quotient is accurate to ~1e-8.
"""

import pytest
import torch
from transformer_lens.utilities import get_act_name

from lens_attn.ablation import metrics
from lens_attn.ablation.attribution import attribution_patching, rank_correlation
from lens_attn.ablation.sweep import ablation_sweep
from lens_attn.compat import is_hooked
from lens_attn.loading import BUNDLED_CHECKPOINT as BUNDLED
from lens_attn.probes import induction_probes, pad


@pytest.fixture(scope="module")
def model64(tiny_checkpoints):
    from lens_attn.loading import load_model

    model = load_model(tiny_checkpoints["gqa"].path, device="cpu")
    return model.to(torch.float64)  # a private copy: the session's tiny_model is not touched


def _eps(model) -> float:
    """The finite-difference step. A TransformerBridge (even in float64) does its softmax in
    float32, like HF's eager attention, so a step of 1e-4 would amplify float32 rounding (~4e-7 on
    a loss of 6) to ~1e-4 in the difference quotient; at 1e-2 it adds ~2e-5 and the truncation
    error (~eps^2) about as little: measured within 3e-6 of the estimate on this model."""
    return 1e-4 if is_hooked(model) else 1e-2


def _probes(model):
    return induction_probes(model, periods=(5, 7), n_per_period=2, seed=5)


@torch.no_grad()
def _line_metric(model, probes, layer, head, t, target, metric):
    """Mean metric with one head's z moved ``t`` of the way to ``target`` (None: zero)."""
    tokens, mask = pad(probes)

    def move(z, hook):
        goal = torch.zeros_like(z[:, :, head]) if target is None else target[: z.shape[1], head]
        z = z.clone()
        z[:, :, head] = z[:, :, head] + t * (goal - z[:, :, head])
        return z

    logits = model.run_with_hooks(tokens, fwd_hooks=[(get_act_name("z", layer), move)])
    periods = [p.period for p in probes]
    return float(metrics.per_prompt(metric, logits, tokens, mask, periods=periods).mean())


@pytest.mark.parametrize("metric", ["loss", "induction_loss"])
def test_estimate_is_the_directional_derivative(model64, metric):
    probes = _probes(model64)
    estimate = attribution_patching(model64, probes, metric=metric, batch_size=3)
    eps = _eps(model64)
    for layer, head in [(0, 1), (1, 4), (2, 0)]:
        plus = _line_metric(model64, probes, layer, head, eps, None, metric)
        minus = _line_metric(model64, probes, layer, head, -eps, None, metric)
        derivative = (plus - minus) / (2 * eps)
        unit = estimate.units.index([(layer, head)])
        # estimate is stored as float32: 1e-5 absolute on derivatives of order 0.01..1
        assert float(estimate.delta[unit]) == pytest.approx(derivative, abs=1e-5)


def test_mean_method_uses_the_reference_mean(model64):
    probes = _probes(model64)
    estimate = attribution_patching(model64, probes, method="mean", reference=probes)
    tokens, mask = pad(probes)
    name = get_act_name("z", 1)
    with torch.no_grad():
        _, cache = model64.run_with_cache(tokens, names_filter=name)
    weight = mask[:, :, None, None].double()
    mean = (cache[name] * weight).sum(0) / weight.sum(0)  # [pos, head_index, d_head]
    eps = _eps(model64)
    plus = _line_metric(model64, probes, 1, 2, eps, mean, "loss")
    minus = _line_metric(model64, probes, 1, 2, -eps, mean, "loss")
    unit = estimate.units.index([(1, 2)])
    assert float(estimate.delta[unit]) == pytest.approx((plus - minus) / (2 * eps), abs=1e-5)


def test_per_prompt_estimates_do_not_depend_on_batching(model64):
    probes = _probes(model64)
    together = attribution_patching(model64, probes, batch_size=8)
    alone = attribution_patching(model64, probes, batch_size=1)
    # float64 model, float32 results: batching changes nothing beyond float32 rounding
    torch.testing.assert_close(together.ablated_per_prompt, alone.ablated_per_prompt)
    assert together.estimate and together.to_dataframe().shape[0] == 3 * 6


def test_parameter_gradients_stay_untouched(model64):
    attribution_patching(model64, _probes(model64))
    assert all(p.grad is None for p in model64.parameters())


def test_estimate_ranks_like_the_exact_sweep(tiny_model):
    # a random-init model, where effects are large and the linear estimate is rough: the ranking
    # still has to agree (measured 0.81-0.95 on such models; the bundled checkpoint is in the bench)
    probes = induction_probes(tiny_model, periods=(9,), n_per_period=6, seed=1)
    exact = ablation_sweep(tiny_model, probes)
    estimate = attribution_patching(tiny_model, probes)
    assert rank_correlation(estimate.delta, exact.delta) > 0.6


def test_rank_correlation():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert rank_correlation(a, a**3) == pytest.approx(1.0)
    assert rank_correlation(a, -a) == pytest.approx(-1.0)
    b = torch.tensor([1.0, 1.0, 2.0, float("nan"), 3.0])  # ties share ranks, NaN pairs dropped
    scipy_stats = pytest.importorskip("scipy.stats")
    keep = ~b.isnan()
    expected = scipy_stats.spearmanr(a[keep].numpy(), b[keep].numpy()).statistic
    assert rank_correlation(a, b) == pytest.approx(expected)


def test_bad_input_errors(tiny_model):
    probes = _probes(tiny_model)
    with pytest.raises((ValueError, TypeError), match="mean"):
        attribution_patching(tiny_model, probes, method="bos")
    with pytest.raises(ValueError, match="accuracy has no useful gradient"):
        attribution_patching(tiny_model, probes, metric="accuracy")
    with pytest.raises(ValueError, match="needs reference data"):
        attribution_patching(tiny_model, probes, method="mean")
    with pytest.raises(ValueError, match="batch_size"):
        attribution_patching(tiny_model, probes, batch_size=0)


def test_qk_fix_changes_only_heads_with_later_attention(tiny_model):
    from lens_attn.ablation.attribution import attribution_patching
    from lens_attn.probes import induction_probes

    probes = induction_probes(tiny_model, periods=(5, 9), n_per_period=4)
    plain = attribution_patching(tiny_model, probes, metric="induction_loss")
    fixed = attribution_patching(tiny_model, probes, metric="induction_loss", qk_fix=True)
    last = tiny_model.cfg.n_layers - 1
    # the last layer has no later pattern to recompute: its estimates must not move at all
    torch.testing.assert_close(fixed.grid()[last], plain.grid()[last], atol=1e-6, rtol=0)
    # earlier heads do change (the correction is exact minus linear, nonzero for random weights)
    assert (fixed.grid()[:last] - plain.grid()[:last]).abs().max() > 1e-6


@pytest.mark.skipif(
    not (BUNDLED / "model.safetensors").exists(), reason="bundled checkpoint not built"
)
def test_qk_fix_finds_the_heads_that_feed_induction():
    import lens_attn
    from lens_attn.ablation.attribution import attribution_patching

    model = lens_attn.load_model(device="cpu")
    probes = lens_attn.induction_probes(model, n_per_period=16)
    plain = attribution_patching(model, probes, metric="induction_loss")
    fixed = attribution_patching(model, probes, metric="induction_loss", qk_fix=True)
    # the exact sweep's top two are L0H0 and L0H1 (7.6 nats each, through layer 1's keys/queries):
    # the linear estimate misses them, the QK fix ranks them first
    assert {u for u, _ in fixed.top(2)} == {"L0H0", "L0H1"}
    assert not {u for u, _ in plain.top(2)} & {"L0H0", "L0H1"}


def test_margin_needs_a_next_token_loss(tiny_model):
    probes = _probes(tiny_model)
    with pytest.raises(ValueError, match="margin=True needs a next-token loss"):
        attribution_patching(tiny_model, probes, metric="logit_diff", margin=True)
    with pytest.raises(ValueError, match="already includes the QK fix"):
        attribution_patching(tiny_model, probes, metric="loss", margin=True, qk_fix=True)


def test_margin_estimate_is_per_prompt_and_batch_independent(model64):
    probes = _probes(model64)
    together = attribution_patching(model64, probes, metric="induction_loss", margin=True)
    alone = attribution_patching(
        model64, probes, metric="induction_loss", margin=True, batch_size=1
    )
    torch.testing.assert_close(together.ablated_per_prompt, alone.ablated_per_prompt)
    # the baseline is the metric itself, as in the sweep
    exact = ablation_sweep(model64, probes, metric="induction_loss")
    torch.testing.assert_close(together.baseline_per_prompt, exact.baseline_per_prompt)


@pytest.mark.hooked_only
@pytest.mark.skipif(
    not (BUNDLED / "model.safetensors").exists(), reason="bundled checkpoint not built"
)
def test_margin_ranks_like_the_exact_sweep_on_every_seed():
    import lens_attn

    model = lens_attn.load_model(device="cpu")
    for seed in range(5):
        probes = induction_probes(model, periods=(23, 41), n_per_period=16, seed=seed)
        exact = ablation_sweep(model, probes, metric="induction_loss")
        estimate = attribution_patching(model, probes, metric="induction_loss", margin=True)
        # measured 0.924 / 0.945 / 0.909 / 0.924 / 0.874 for seeds 0-4 (qk_fix: 0.81 .. 0.58)
        assert rank_correlation(estimate.delta, exact.delta) > 0.8, seed
        assert {u for u, _ in estimate.top(1)} == {"L0H0"}, seed


@pytest.mark.hooked_only
@pytest.mark.parametrize("flag", ["qk_fix", "margin"])
def test_qk_fix_and_margin_on_a_bridge_equal_the_hooked_model(tiny_checkpoints, flag):
    """The same checkpoint as a HookedTransformer and a TransformerBridge: the estimates must
    agree to float32 rounding of two different forwards (2e-5 on deltas of order 0.1-1)."""
    from lens_attn.loading import load_model

    path = tiny_checkpoints["gqa"].path
    hooked = load_model(path, backend="hooked", device="cpu")
    bridge = load_model(path, backend="bridge", device="cpu")
    probes = _probes(hooked)
    ours = attribution_patching(bridge, probes, metric="loss", **{flag: True})
    theirs = attribution_patching(hooked, probes, metric="loss", **{flag: True})
    plain = attribution_patching(hooked, probes, metric="loss")
    torch.testing.assert_close(ours.delta, theirs.delta, atol=2e-5, rtol=0)
    assert (theirs.delta - plain.delta).abs().max() > 1e-4  # the flag changes the estimate


def test_qk_fix_and_margin_refused_in_one_line_where_attention_cannot_be_recomputed(
    tiny_checkpoints, monkeypatch
):
    from lens_attn.errors import LensAttnError
    from lens_attn.loading import load_model

    bridge = load_model(tiny_checkpoints["gqa"].path, backend="bridge", device="cpu")
    hf_attention = bridge.blocks[1].attn.original_component
    monkeypatch.setattr(hf_attention, "attn_logit_softcapping", 30.0, raising=False)
    probes = _probes(bridge)
    for flag in ("qk_fix", "margin"):
        with pytest.raises(LensAttnError, match=f"{flag}=True recomputes .* soft-capped") as err:
            attribution_patching(bridge, probes, metric="loss", **{flag: True})
        assert "\n" not in str(err.value)
