"""The p-values behind ``confirm``'s verdicts, and their correction across a run.

    >>> sign_flip_p(torch.tensor([0.3, 0.1, 0.2, 0.4, 0.25]))    # all 5 prompts agree: 2**-5
    0.03125
    >>> benjamini_hochberg([0.01, 0.04, 0.03, 0.005])   # p * 4 / rank, then running minima
    [0.02, 0.04, 0.04, 0.02]

Three tests, each for the kind of claim it judges (``lens_attn.ablation.confirm`` says which claim
uses which):

- ``sign_flip_p(x)``: one-sided test over prompts that the per-prompt values ``x`` have a
  positive centre. Under the null each prompt's value is symmetric about 0, so every pattern of
  signs is equally likely; the p-value is the share of the ``2**n`` sign patterns whose mean is
  at least the observed one (exact for ``n <= EXACT_MAX`` prompts, else ``MONTE_CARLO`` seeded
  random patterns plus the observed one). It assumes no normality and reaches ``2**-n``
  (``2**-16 = 1.5e-5`` on 16 prompts).
- ``prediction_t_p(x, null)``: one-sided test that ``x`` (the group's effect) is above a new draw
  from the population that the ``null`` values (random size-matched sets' effects) come from:
  ``t = (x - mean) / (sd * sqrt(1 + 1/n))`` with ``n - 1`` degrees of freedom, the t prediction
  interval. Exact when the random sets' effects are normal; a rank among ``n`` random sets
  cannot go below ``1/(n+1)``, this can, at the price of that assumption.
- ``tost_p(x, bound)``: two one-sided tests (Schuirmann 1987) that the per-prompt values'
  centre is inside ``(-bound, bound)``: the larger of ``sign_flip_p(bound - x)`` and
  ``sign_flip_p(x + bound)``. A claim of no effect needs this; a failed test of harm is no
  evidence of none.

Correction across a run's tests: ``benjamini_hochberg`` (step-up, Benjamini and Hochberg 1995:
the adjusted ``p_(i) = min_{j >= i} p_(j) m / j``, capped at 1) keeps the expected share of
false claims among those called significant at ``alpha``; ``holm`` (step-down, Holm 1979:
``max_{j <= i} (m - j + 1) p_(j)``) keeps the chance of any false claim at ``alpha``.
"""

import math
from collections.abc import Sequence
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

EXACT_MAX = 16  # prompts up to which every sign pattern is enumerated (65,536 of them)
MONTE_CARLO = 2**16 - 1  # random sign patterns beyond that (p >= 1 / 2**16)
Correction = Literal["bh", "holm"]


def _sign_patterns(n: int) -> Float[Tensor, "pattern prompt"]:
    """Every ``+-1`` pattern over ``n`` prompts (``n <= EXACT_MAX``), or ``MONTE_CARLO`` seeded
    random ones with the all-plus pattern (the observed sample) first."""
    if n <= EXACT_MAX:
        codes = torch.arange(2**n)
        bits = (codes[:, None] >> torch.arange(n)[None]) & 1
        return 1.0 - 2.0 * bits.double()
    g = torch.Generator().manual_seed(n)
    random = torch.randint(0, 2, (MONTE_CARLO, n), generator=g).double() * 2 - 1
    return torch.cat([torch.ones(1, n, dtype=torch.float64), random])


_PATTERNS: dict[int, Tensor] = {}


def sign_flip_p(x: Float[Tensor, " prompt"]) -> float:
    """One-sided sign-flip permutation p-value that ``x`` is centred above 0 (module docstring).

    NaN values are dropped; an empty ``x`` or all zeros gives 1.0.
    """
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    x = x[~torch.isnan(x)]
    n = x.shape[0]
    if n == 0:
        return 1.0
    if n not in _PATTERNS:
        _PATTERNS[n] = _sign_patterns(n)
    means = _PATTERNS[n] @ x  # [pattern]: sums, same order as means
    observed = float(x.sum())
    tol = 1e-12 * max(1.0, float(x.abs().sum()))  # ties of the sum up to rounding count as >=
    return float((means >= observed - tol).double().mean())


def tost_p(x: Float[Tensor, " prompt"], bound: float) -> float:
    """Two one-sided sign-flip tests that ``x``'s centre lies in ``(-bound, bound)``."""
    x = torch.as_tensor(x, dtype=torch.float64)
    return max(sign_flip_p(bound - x), sign_flip_p(x + bound))


def t_sf(t: float, df: float) -> float:
    """``P(T >= t)`` for Student's t with ``df`` degrees of freedom (regularized incomplete beta)."""
    if math.isnan(t) or df <= 0:
        return math.nan
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return tail if t > 0 else 1.0 - tail


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta ``I_x(a, b)`` by Lentz's continued fraction (Numerical
    Recipes 6.4), with the symmetry ``I_x(a, b) = 1 - I_{1-x}(b, a)`` where it converges slower."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1.0 - x)
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 300):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * f / a


def prediction_t_p(x: float, null: Sequence[float]) -> float:
    """One-sided p-value that ``x`` exceeds a new draw from ``null``'s population (module
    docstring); NaN with fewer than 2 null values, 0 or 1 when they have no spread."""
    values = [v for v in null if not math.isnan(v)]
    n = len(values)
    if n < 2 or math.isnan(x):
        return math.nan
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    if sd == 0.0:
        return 0.0 if x > mean else 1.0
    return t_sf((x - mean) / (sd * math.sqrt(1 + 1 / n)), float(n - 1))


def benjamini_hochberg(p: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values, in ``p``'s order; NaN stays NaN and is not counted."""
    return _adjust(p, "bh")


def holm(p: Sequence[float]) -> list[float]:
    """Holm (step-down Bonferroni) adjusted p-values, in ``p``'s order; NaN stays NaN."""
    return _adjust(p, "holm")


def adjust(p: Sequence[float], method: Correction = "bh") -> list[float]:
    """``benjamini_hochberg`` (``"bh"``) or ``holm`` (``"holm"``) of ``p``."""
    if method not in ("bh", "holm"):
        raise ValueError(f"correction must be 'bh' or 'holm', got {method!r}")
    return _adjust(p, method)


def _adjust(p: Sequence[float], method: Correction) -> list[float]:
    finite = [(v, i) for i, v in enumerate(p) if not math.isnan(v)]
    m = len(finite)
    out = [math.nan] * len(p)
    order = sorted(finite)  # ascending p
    if method == "bh":
        running = 1.0
        for rank in range(m, 0, -1):  # from the largest p down: a running minimum
            value, i = order[rank - 1]
            running = min(running, value * m / rank)
            out[i] = running
    else:
        running = 0.0
        for rank, (value, i) in enumerate(order, start=1):  # a running maximum
            running = max(running, min(1.0, (m - rank + 1) * value))
            out[i] = running
    return out
