"""Attribution patching: estimate every head's ablation effect from one forward and one backward.

    >>> probes = lens_attn.induction_probes(model, n_per_period=4)
    >>> estimate = lens_attn.attribution_patching(model, probes, metric="induction_loss",
    ...                                           margin=True, progress=False)
    >>> exact = lens_attn.ablation_sweep(model, probes, metric="induction_loss", progress=False)
    >>> rank_correlation(estimate.delta, exact.delta) > 0.4  # margin=True: ~0.9
    True

The metric is a function of every head's output ``z = hook_z[:, :, head]``. Ablating a head replaces
its ``z`` by ``z_ablated`` (0 for ``zero``, the reference mean for ``mean``); to first order

    metric(ablated) - metric(clean)  ~=  sum over pos, d_head of  d metric / d z  *  (z_ablated - z)

with the gradient taken once, on the clean run, for every head of every layer together (a total
derivative: it includes the paths through later layers). The estimate is per prompt, so it carries a
standard error over prompts like the exact sweep (``AblationResult`` with ``estimate=True``).

Where it is poor. It is a linear estimate around the clean run, so it is trustworthy for small
effects and for ranking heads, and unreliable:

- for heads whose ablation has a *large* effect (the metric is not linear that far away: losses
  saturate, a knocked-out induction head changes what later heads attend to);
- through saturated attention: the softmax is flat where a head already puts ~all its weight on one
  key, so the gradient through later heads' patterns is ~0 even when removing the head flips them;
- for ``accuracy`` (piecewise constant: its gradient is 0 almost everywhere; use a loss) and for
  pattern-based ablations (``bos``, ``uniform``), which this function does not estimate.

Measured on the bundled checkpoint (``experiments/bench_ablation.py``, default probes): Spearman
correlation with the exact zero-ablation sweep is 0.50 on ``induction_loss`` and 0.15 on ``loss``
over all 32 heads, and 0.89 / 0.69 over the heads of layers 1-3. Layer 0 is where it fails: its previous-token and
current-token heads cost ~7.6 nats each when ablated, but act through the induction heads' nearly
one-hot attention (and a clean induction_loss of 0.02 nats, a saturated output softmax), so their
gradients are ~0 and even the signs are wrong. On random-init models (no saturation) it is
0.8-0.95. Use it to rank heads within a layer, and confirm with ``ablation_sweep``.

``qk_fix=True`` applies AtP*'s QK fix (Kramár et al. 2024, "AtP*: An efficient and scalable method
for localizing LLM behaviour to components"): the change each head's ablation makes to every later
layer's pattern through its queries and keys is computed exactly. On the bundled checkpoint it puts
L0H0 and L0H1 back at the top of the ranking (Spearman 0.81 on induction_loss with the default
probes), but it is not robust: 0.78 and 0.61 with probe seeds 1 and 2, where plain attribution gives
0.43 and 0.62. Their estimated deltas stay ~100x too small: the indirect paths through the value
vectors and the saturated output softmax are still linear.

Margin estimator (``margin=True``, for ``loss`` and ``induction_loss``). Path patching on the
bundled checkpoint shows where layer 0's effect goes: all of it through layer 1's attention
(L0H0 through its keys, 7.57 of 7.59 nats, and queries; L0H1 through its queries and values; L0H3
keys and values; L0H6 values only), none through the residual stream or MLPs directly. Two things
then defeat the linear estimate: the later attention's response is not linear (queries, keys
*and* values), and the loss is the saturated ``softplus(-margin)`` of each prediction's log-odds
``margin = logit[y] - logsumexp(other logits)`` (clean induction_loss 0.02 nats: slope ~0). So:

1. one forward and one backward pass of ``sum of margins`` over the measured predictions (the
   margin is not saturated; its gradient is well conditioned);
2. per head, the linear margin change ``(z_ablated - z) . d margins / d z`` is counted at the
   positions the head writes to;
3. for every later layer, the head's change to the residual stream (direct path) is run through
   that layer's attention exactly (patterns and values: AtP*'s QK fix extended to the whole
   attention output), times the gradient at that layer's ``z``, counted at the *query* positions
   that read it; the same layer's linear response (a vector-Jacobian product of one attention
   layer per layer, pulled back to the writing positions) is taken out, so nothing is counted
   twice;
4. each prediction's loss is recomputed exactly from its shifted margin, ``softplus(-(m + dm))``,
   and averaged as the metric does.

Cost: no extra model pass; ``n_layers - 1`` single-attention-layer forward+backward passes and
``n_heads * n_layers * (n_layers - 1) / 2`` attention-layer recomputations (stacked over heads).
Measured wall time on the bundled model, relative to plain attribution (one forward + backward),
over four runs of ``experiments/bench_ablation.py`` (2026-12-02 and -03): ``margin`` 3.5-5.1x,
``qk_fix`` 5.3-6.0x, the exact sweep 3.8-4.5x. On a model this small the exact sweep is as cheap,
so use it; the estimate is for models whose sweep is not (the recomputation grows as
``n_layers**2 * n_heads`` attention layers, the sweep as ``n_layers**2 * n_heads`` whole layers
plus unembeddings, each over the whole batch).

Measured Spearman correlation with the exact zero-ablation sweep on the bundled checkpoint,
``induction_probes(periods=(23, 41), n_per_period=16, seed=s)``, ``induction_loss``:

=========  ============================  ============================
seed       all 32 heads: plain/qk/margin  layers 1-3: plain/qk/margin
=========  ============================  ============================
0          0.50 / 0.81 / 0.92            0.89 / 0.89 / 0.90
1          0.43 / 0.78 / 0.95            0.89 / 0.89 / 0.98
2          0.62 / 0.61 / 0.91            0.91 / 0.91 / 0.97
3          0.58 / 0.58 / 0.92            0.87 / 0.87 / 0.97
4          0.57 / 0.65 / 0.87            0.90 / 0.90 / 0.99
=========  ============================  ============================

``loss`` on ``builtin_probes`` (repeated random, natural text and repeated-token prompts), seeds
0/1, all heads: plain 0.58/0.60, qk_fix 0.71/0.77, margin 0.86/0.90 (layers 1-3: 0.86/0.90,
0.85/0.90, 0.92/0.91). ``loss`` over the whole induction probes (half of it the unpredictable
first copy), seeds 0-4, all heads: plain 0.15-0.51, qk_fix 0.20-0.48, margin 0.58-0.79: below 0.8.

Where the margin estimate is still poor. It ranks; its magnitudes are still too small. L0H0 and
L0H1 (7.6 nats each) are estimated at ~1.2 and ~0.4 (still the top two or three), the layer-1
induction heads ~4x too small (the layers after them respond nonlinearly: a finite-difference
check shows their linear response carries about half the margin change, and the margin itself
is nonlinear in the final residual stream). L0H6, whose 0.13 nats go through layer 1's values,
is estimated at ~0.003: even the exact change of the final residual stream it causes, pushed
linearly through the final norm and unembedding, gives a mean margin drop of 0.15 where the true
drop is 2.2, so no linearisation short of the logits recovers it. Paths that reach a later
attention layer through an MLP or another attention layer stay linear. Confirm magnitudes with
``ablation_sweep``.
"""

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens.utilities import get_act_name

from lens_attn.ablation import replay
from lens_attn.ablation.inputs import prepare
from lens_attn.ablation.methods import Reference, check_method
from lens_attn.ablation.metrics import (
    MetricFn,
    MetricName,
    check_metric,
    induction_targets,
    per_prompt,
    real_predictions,
)
from lens_attn.ablation.result import AblationResult, provenance
from lens_attn.blocks import block_view, replay_blocker
from lens_attn.errors import InputError
from lens_attn.probes import Probe
from lens_attn.progress import progress_bar

AttributionMethod = Literal["zero", "mean"]
MARGIN_METRICS = ("loss", "induction_loss")


def attribution_patching(
    model,
    tokens_or_probes: "list[str] | list[Probe] | Tensor | None",
    *,
    metric: MetricName | MetricFn = "loss",
    method: AttributionMethod = "zero",
    reference: "list[str] | list[Probe] | Tensor | None" = None,
    answer_tokens=None,
    batch_size: int = 8,
    qk_fix: bool = False,
    margin: bool = False,
    progress: bool = False,
) -> AblationResult:
    """Estimate the ``metric`` delta of ablating each head alone, from gradients on the clean run.

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge`` in compatibility mode.
        tokens_or_probes: prompts, ``Probe`` objects, a ``[batch, pos]`` token tensor, or ``None``.
        metric: as in ``ablation_sweep``; must be differentiable in the logits (not ``accuracy``).
        method: ``zero`` or ``mean`` (the ablated ``z`` the gradient is multiplied with).
        reference: prompts whose per-position mean ``hook_z`` the ``mean`` method uses.
        answer_tokens: the ``(correct, incorrect)`` pair for ``metric="logit_diff"``.
        batch_size: prompts per forward/backward pass (memory holds their graph).
        qk_fix: AtP*'s fix for saturated attention (Kramár et al. 2024): for every later layer, the
            change a head's ablation makes to that layer's attention pattern through its queries
            and keys (the direct residual path) is computed exactly instead of linearly; the
            pattern's gradient carries it on. No extra forward or backward pass of the model, but
            ``n_layers * n_heads * n_layers / 2`` pattern recomputations (``HookedTransformer`` only).
        margin: estimate in log-odds space (``loss`` and ``induction_loss`` only; see "Margin
            estimator" in the module docstring): every later layer's attention output (queries,
            keys *and* values) is recomputed exactly on the direct path, the change of each
            prediction's margin is accumulated per position, and the loss is applied exactly to
            the shifted margins. Much better than ``qk_fix`` where the output softmax is
            saturated; it includes the QK fix (pass one of the two). No extra model pass; 4-8x
            plain attribution on the bundled model (``HookedTransformer``, pre-norm rotary
            attention only).
        progress: report progress (``lens_attn.progress``).

    Returns:
        An ``AblationResult`` over every single head, ``estimate=True``: ``ablated`` is the clean
        metric plus the estimated delta. The model's parameter gradients are not touched.
    """
    check_method(method, get_args(AttributionMethod))
    metric_name = check_metric(metric)
    if metric == "accuracy":
        raise ValueError("accuracy has no useful gradient; estimate a loss or logit_diff instead")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if margin and qk_fix:
        raise ValueError("margin=True already includes the QK fix; pass margin=True or qk_fix=True")
    if margin and metric not in MARGIN_METRICS:
        raise ValueError(
            f"margin=True needs a next-token loss metric {MARGIN_METRICS}, got {metric_name!r}"
        )
    if (margin or qk_fix) and (why := replay_blocker(model)) is not None:
        flag = "margin=True" if margin else "qk_fix=True"
        raise InputError(
            f"{flag} recomputes every later layer's attention, which lens-attn can't reproduce "
            f"for this model ({why}); plain attribution_patching (without it) runs on any model"
        )
    if margin and model.cfg.positional_embedding_type != "rotary":
        raise ValueError("margin=True recomputes rotary attention (Llama-style models) only")
    probes, batch = prepare(model, tokens_or_probes, metric, answer_tokens)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    layers = list(range(n_layers))
    ref = None
    if method == "mean":
        if reference is None:
            raise ValueError(
                "method='mean' needs reference data: pass reference=<prompts, probes or tokens>"
            )
        ref = Reference.build(model, reference, layers, keep_z=False)

    n_prompts = batch.tokens.shape[0]
    baseline = torch.empty(n_prompts)
    estimate = torch.empty(n_layers, n_heads, n_prompts)
    starts = range(0, n_prompts, batch_size)
    for lo in progress_bar(starts, desc="attribution", unit="batch", enabled=progress):
        hi = min(lo + batch_size, n_prompts)
        if margin:
            values, effect = _margin_batch(model, batch, lo, hi, metric, method, ref)
        else:
            values, effect = _one_batch(model, batch, lo, hi, metric, method, ref, qk_fix)
        baseline[lo:hi] = values
        estimate[:, :, lo:hi] = effect
    units = [[(layer, head)] for layer in layers for head in range(n_heads)]
    ablated = baseline[None] + estimate.reshape(n_layers * n_heads, n_prompts)
    info = provenance(model, probes, batch_size=batch_size, qk_fix=qk_fix, margin=margin)
    return AblationResult(
        units, baseline, ablated, n_layers, n_heads, method, metric_name, True, info
    )


def _z_taps(n_layers: int) -> tuple[list, dict[int, Tensor], dict[int, Tensor]]:
    """Hooks on every layer's ``hook_z``, the clean ``z`` they keep, and the zero leaves they add.

    ``z + 0`` with a leaf "0": d metric / d leaf is the total derivative with respect to that
    layer's ``z``, whether or not the model's parameters require grad, and their ``.grad`` stays
    untouched.
    """
    clean: dict[int, Tensor] = {}
    leaves: dict[int, Tensor] = {}

    def tap(layer):
        def hook(z, hook):
            leaves[layer] = torch.zeros_like(z, requires_grad=True)
            clean[layer] = z.detach()
            return z + leaves[layer]

        return hook

    return (
        [(get_act_name("z", layer), tap(layer)) for layer in range(n_layers)],
        clean,
        leaves,
    )


def _one_batch(
    model, batch, lo: int, hi: int, metric, method: str, ref, qk_fix: bool = False
) -> tuple[Float[Tensor, " batch"], Float[Tensor, "layer head_index batch"]]:
    """Clean metric per prompt and the linear estimate of every head's delta, prompts ``lo:hi``."""
    device = model.cfg.device
    tokens, mask = batch.tokens[lo:hi].to(device), batch.mask[lo:hi].to(device)
    hooks, clean, probes = _z_taps(model.cfg.n_layers)
    resid: dict[int, Tensor] = {}
    pattern_probes: dict[int, Tensor] = {}
    if qk_fix:

        def keep_resid(layer):
            def hook(x, hook):
                resid[layer] = x.detach()

            return hook

        def tap_pattern(layer):
            def hook(p, hook):
                pattern_probes[layer] = torch.zeros_like(p, requires_grad=True)
                return p + pattern_probes[layer]

            return hook

        for layer in range(1, model.cfg.n_layers):
            hooks.append((get_act_name("resid_pre", layer), keep_resid(layer)))
            hooks.append((get_act_name("pattern", layer), tap_pattern(layer)))
    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, attention_mask=mask.long(), fwd_hooks=hooks)
        values = per_prompt(
            metric, logits, tokens, mask,
            periods=None if batch.periods is None else batch.periods[lo:hi],
            answer_tokens=None if batch.answers is None else batch.answers[lo:hi],
        )  # fmt: skip
        # prompts don't interact, so the gradient of the sum gives each prompt its own gradient
        layers = sorted(probes)
        pattern_layers = sorted(pattern_probes)
        leaves = [probes[layer] for layer in layers] + [
            pattern_probes[lay] for lay in pattern_layers
        ]
        all_grads = torch.autograd.grad(values.sum(), leaves)
        grads = all_grads[: len(layers)]
        pattern_grads = dict(zip(pattern_layers, all_grads[len(layers) :], strict=True))
    effects = []
    for layer, grad in zip(layers, grads, strict=True):
        z = clean[layer]  # [batch, pos, head_index, d_head]
        target = torch.zeros_like(z) if method == "zero" else ref.mean_z(layer, z.shape[1])
        weight = mask[:, :, None, None].to(z.dtype)  # padded positions change nothing
        effect = ((target - z) * grad * weight).sum(dim=(1, 3)).T  # [head_index, batch]
        if qk_fix:
            effect = effect + _qk_correction(
                model, layer, (target - z) * weight, resid, pattern_grads, mask
            )
        effects.append(effect)
    return values.detach().float().cpu(), torch.stack(effects).float().cpu()


def _margin_batch(
    model, batch, lo: int, hi: int, metric, method: str, ref
) -> tuple[Float[Tensor, " batch"], Float[Tensor, "layer head_index batch"]]:
    """Clean metric per prompt and the margin estimate of every head's delta, prompts ``lo:hi``.

    See "Margin estimator" in the module docstring for the method.
    """
    device = model.cfg.device
    tokens, mask = batch.tokens[lo:hi].to(device), batch.mask[lo:hi].to(device)
    periods = None if batch.periods is None else batch.periods[lo:hi]
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    resid: dict[int, Tensor] = {}

    def keep_resid(layer):
        def hook(x, hook):
            resid[layer] = x.detach()

        return hook

    hooks, clean, leaves = _z_taps(n_layers)
    hooks += [(get_act_name("resid_pre", lay), keep_resid(lay)) for lay in range(1, n_layers)]
    where = _loss_positions(metric, tokens, mask, periods)  # [batch, pos - 1]
    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, attention_mask=mask.long(), fwd_hooks=hooks)
        values = per_prompt(metric, logits, tokens, mask, periods=periods)
        margins = _margins(logits, tokens, where)
        layers = list(range(n_layers))
        # d (sum of all margins) / d z: the margins are additive over positions and prompts
        grads = dict(zip(layers, torch.autograd.grad(margins.sum(), [leaves[i] for i in layers]),
                         strict=True))  # fmt: skip
        # each later attention layer's own linear response, pulled back onto its input
        pullback = {}
        for later in range(1, n_layers):
            x = resid[later].clone().requires_grad_(True)
            z = replay.attention_z(block_view(model, later), x, mask)
            (pullback[later],) = torch.autograd.grad(z, x, grads[later])
    margins = margins.detach()
    weight = where / where.sum(dim=1, keepdim=True)  # per_prompt's mean over the positions
    clean_loss = F.softplus(-margins)
    n_prompts, n_pos = tokens.shape
    effects = []
    with torch.no_grad():
        for layer in layers:
            z = clean[layer]  # [batch, pos, head_index, d_head]
            target = torch.zeros_like(z) if method == "zero" else ref.mean_z(layer, z.shape[1])
            dz = (target - z) * mask[:, :, None, None].to(z.dtype)
            # linear margin change at the positions where each head writes (all paths)
            shift = torch.einsum("bphd,bphd->hbp", dz, grads[layer])
            delta = torch.einsum("bphd,hdm->hbpm", dz, model.blocks[layer].attn.W_O)
            for later in range(layer + 1, n_layers):
                # replace the linear path through this attention layer (counted at the writing
                # positions) by its exact change (counted at the reading, query positions)
                shift -= torch.einsum("hbpm,bpm->hbp", delta, pullback[later])
                moved = (resid[later][None] + delta).flatten(0, 1)
                z2 = replay.attention_z(block_view(model, later), moved, mask.repeat(n_heads, 1))
                z2 = z2.unflatten(0, (n_heads, n_prompts)) - clean[later][None]
                shift += torch.einsum("gbphd,bphd->gbp", z2, grads[later])
            shifted = F.softplus(-(margins[None] + shift[:, :, :-1]))
            effects.append((weight[None] * (shifted - clean_loss[None])).sum(dim=-1))
    return values.detach().float().cpu(), torch.stack(effects).float().cpu()


def _loss_positions(
    metric, tokens: Int[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"], periods
) -> Bool[Tensor, "batch pos-1"]:
    """The predictions ``t -> t + 1`` that ``loss`` / ``induction_loss`` average over."""
    if metric == "induction_loss":
        return induction_targets(tokens, mask, periods)
    return real_predictions(tokens, mask)


def _margins(
    logits: Float[Tensor, "batch pos d_vocab"],
    tokens: Int[Tensor, "batch pos"],
    where: Bool[Tensor, "batch pos-1"],
) -> Float[Tensor, "batch pos-1"]:
    """Log-odds of the next token, ``logit[y] - logsumexp(other logits)``, at ``where`` (0 elsewhere).

    The next-token loss is exactly ``softplus(-margin)``.
    """
    rows, cols = where.nonzero(as_tuple=True)
    picked = logits[rows, cols]
    picked = picked if picked.dtype == torch.float64 else picked.float()
    target = tokens[rows, cols + 1][:, None]
    right = picked.gather(-1, target)[:, 0]
    others = picked.scatter(-1, target, float("-inf")).logsumexp(dim=-1)
    out = torch.zeros(where.shape, dtype=picked.dtype, device=logits.device)
    return out.index_put((rows, cols), right - others)


@torch.no_grad()
def _qk_correction(
    model, layer: int, dz: Tensor, resid: dict, pattern_grads: dict, mask: Tensor
) -> Tensor:
    """Per head of ``layer``: (exact - linear) change of every later layer's pattern through its
    queries and keys, times that pattern's gradient. ``dz`` is ``z_ablated - z`` ``[batch, pos, head, d_head]``."""
    w_o = block_view(model, layer).W_O  # [head_index, d_head, d_model]
    out = torch.zeros(dz.shape[2], dz.shape[0], device=dz.device)  # [head_index, batch]
    for later in range(layer + 1, model.cfg.n_layers):
        view = block_view(model, later)
        x = view.ln1(resid[later])
        q, k, p = replay.pattern_from(view, x, mask)
        grad = pattern_grads[later]
        for head in range(dz.shape[2]):
            delta = torch.einsum("bpd,dm->bpm", dz[:, :, head], w_o[head])  # residual change
            q2, k2, p2 = replay.pattern_from(view, view.ln1(resid[later] + delta), mask)
            dscores = (
                (q2 - q) @ k.transpose(-1, -2) + q @ (k2 - k).transpose(-1, -2)
            ) / view.attn_scale
            dscores = dscores.masked_fill(~torch.isfinite(dscores), 0.0)
            linear = p * (dscores - (p * dscores).sum(-1, keepdim=True))  # softmax Jacobian
            out[head] += ((p2 - p - linear) * grad).sum(dim=(1, 2, 3))
    return out


def rank_correlation(a: Float[Tensor, " n"], b: Float[Tensor, " n"]) -> float:
    """Spearman's rank correlation (average ranks for ties), ignoring pairs with a NaN."""
    keep = ~(torch.isnan(a) | torch.isnan(b))
    a, b = a[keep].double(), b[keep].double()
    if len(a) < 2:
        raise ValueError("need at least two non-NaN pairs for a rank correlation")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / torch.sqrt((ra**2).sum() * (rb**2).sum()))


def _ranks(x: Tensor) -> Tensor:
    order = torch.argsort(x)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    for value in torch.unique(x):  # ties share their average rank
        tied = x == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks
