"""``lens_attn.ablation.stats``: each p-value and correction against scipy or a definition written
here, and the tests' calibration under their nulls on seeded synthetic data."""

import itertools
import math
import random

import pytest
import torch

from lens_attn.ablation import stats

scipy_stats = pytest.importorskip("scipy.stats")


def _sign_flip_by_enumeration(x: list[float]) -> float:
    """Share of the 2**n sign patterns whose sum is at least the observed one (the definition)."""
    observed = sum(x)
    hits = sum(sum(s * v for s, v in zip(signs, x, strict=True)) >= observed - 1e-12
               for signs in itertools.product((1, -1), repeat=len(x)))  # fmt: skip
    return hits / 2 ** len(x)


@pytest.mark.parametrize("n", [1, 5, 9])
def test_sign_flip_p_is_the_exact_permutation_p_value(n):
    rng = random.Random(n)
    for _ in range(5):
        x = [rng.gauss(0.3, 1.0) for _ in range(n)]
        assert stats.sign_flip_p(torch.tensor(x)) == pytest.approx(_sign_flip_by_enumeration(x))
    assert stats.sign_flip_p(torch.ones(n)) == pytest.approx(2.0**-n)
    assert stats.sign_flip_p(torch.zeros(n)) == 1.0  # nothing: every pattern ties


def test_sign_flip_p_matches_scipy_and_its_monte_carlo_matches_enumeration():
    import numpy as np

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(11, generator=gen, dtype=torch.float64) * 0.8 + 0.4
    ref = scipy_stats.permutation_test(
        (x.numpy(),), lambda v, axis: v.mean(axis=axis), permutation_type="samples",
        alternative="greater", n_resamples=2**11, vectorized=True,
    ).pvalue  # fmt: skip  # 2**n resamples: scipy enumerates every pattern, exactly
    assert stats.sign_flip_p(x) == pytest.approx(ref, abs=1e-12)
    # past EXACT_MAX prompts: 2**16 - 1 random patterns; the exact share by numpy enumeration
    x = torch.randn(18, generator=gen, dtype=torch.float64) * 0.8 + 0.2
    signs = 1 - 2 * ((np.arange(2**18)[:, None] >> np.arange(18)) & 1)
    exact = float(np.mean(signs @ x.numpy() >= x.numpy().sum() - 1e-12))
    # Monte Carlo error of a share over 65,536 patterns: sd <= 0.002; 0.01 allowed
    assert stats.sign_flip_p(x) == pytest.approx(exact, abs=0.01)


def test_t_sf_matches_scipy():
    for t, df in itertools.product((-7.0, -1.3, 0.0, 0.4, 2.1, 5.5, 30.0), (1, 2, 3, 5, 7, 40)):
        assert stats.t_sf(t, float(df)) == pytest.approx(
            scipy_stats.t.sf(t, df), rel=1e-9, abs=1e-300
        )


def test_prediction_t_p_is_the_t_prediction_interval():
    null = [0.2, -0.1, 0.4, 0.05, 0.3, 0.0, 0.15]
    import numpy as np

    n, mean, sd = len(null), np.mean(null), np.std(null, ddof=1)
    for x in (-0.2, 0.2, 0.9, 3.0):
        ref = scipy_stats.t.sf((x - mean) / (sd * math.sqrt(1 + 1 / n)), n - 1)
        assert stats.prediction_t_p(x, null) == pytest.approx(ref, rel=1e-9)
    assert math.isnan(stats.prediction_t_p(1.0, [0.5]))  # no spread to compare with


def test_tost_p_is_the_larger_of_two_one_sided_tests():
    x = torch.tensor([0.01, -0.02, 0.03, 0.0, 0.015, -0.01, 0.02, 0.005], dtype=torch.float64)
    below = _sign_flip_by_enumeration((0.05 - x).tolist())  # H0: centre >= +0.05
    above = _sign_flip_by_enumeration((x + 0.05).tolist())  # H0: centre <= -0.05
    assert stats.tost_p(x, 0.05) == pytest.approx(max(below, above))
    assert stats.tost_p(x, 0.05) == pytest.approx(2.0**-8)  # every prompt inside the margin
    assert stats.tost_p(x + 0.05, 0.05) > 0.5  # centred on the margin: no evidence of equivalence


def test_benjamini_hochberg_matches_scipy_and_holm_matches_its_definition():
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(5):
        p = rng.uniform(size=40) ** 3
        assert stats.benjamini_hochberg(p.tolist()) == pytest.approx(
            scipy_stats.false_discovery_control(p, method="bh").tolist(), rel=1e-12
        )
    # Holm by hand: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04,
    # made non-decreasing: 0.02, 0.03, 0.06, 0.06 (statsmodels' multipletests gives the same)
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # BH by hand: 0.005*4/1, 0.01*4/2, 0.03*4/3, 0.04*4/4 = 0.02, 0.02, 0.04, 0.04
    assert stats.benjamini_hochberg([0.01, 0.04, 0.03, 0.005]) == pytest.approx(
        [0.02, 0.04, 0.04, 0.02]
    )
    assert stats.adjust([0.2, math.nan], "holm")[0] == 0.2  # NaN is not counted as a test
    with pytest.raises((ValueError, TypeError), match="holm"):  # TypeError: the typechecker
        stats.adjust([0.1], "bonferroni")


def test_p_values_are_calibrated_under_their_nulls():
    """False-positive rate at 0.05 over 800 seeded repetitions of a true null: 0.05 for a
    calibrated test (the sign-flip test on 10 prompts is discrete, so at most 0.05). 800 draws
    give a binomial sd of 0.0077; the band is 0.05 +- 3 sd (0.027..0.073), the sign-flip floor
    lower since its exact level is 0.049 (50 of 1024 patterns)."""
    gen = torch.Generator().manual_seed(1)
    reps, hits = 800, {"sign_flip": 0, "sign_flip_heavy": 0, "prediction": 0, "tost": 0}
    for _ in range(reps):
        normal = torch.randn(10, generator=gen, dtype=torch.float64)
        heavy = torch.distributions.Laplace(0.0, 1.0).sample((10,)).double()  # heavy tails
        hits["sign_flip"] += stats.sign_flip_p(normal) <= 0.05
        hits["sign_flip_heavy"] += stats.sign_flip_p(heavy) <= 0.05
        draws = torch.randn(9, generator=gen, dtype=torch.float64).tolist()
        hits["prediction"] += stats.prediction_t_p(draws[0], draws[1:]) <= 0.05
        # TOST at its boundary: centre exactly +0.3 with a margin of 0.3
        hits["tost"] += stats.tost_p(0.3 + 0.2 * normal, 0.3) <= 0.05
    rates = {k: v / reps for k, v in hits.items()}
    for name, rate in rates.items():
        assert 0.027 <= rate <= 0.073, (name, rate)
