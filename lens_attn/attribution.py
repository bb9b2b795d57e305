"""Attribution patching: estimate every head's ablation effect from one forward and one backward.

    >>> estimate = lens_attn.attribution_patching(model, probes, metric="induction_loss")
    >>> exact = lens_attn.ablation_sweep(model, probes, metric="induction_loss")
    >>> rank_correlation(estimate.delta, exact.delta)

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

Measured on the bundled checkpoint (``experiments/bench_ablation.py``): Spearman correlation with
the exact zero-ablation sweep is 0.50 on ``induction_loss`` and 0.15 on ``loss`` over all 32 heads,
and 0.89 / 0.69 over the heads of layers 1-3. Layer 0 is where it fails: its previous-token and
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
"""

from typing import Literal, get_args

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm import tqdm
from transformer_lens import utils

from lens_attn.ablation import AblationResult, Reference, check_method, prepare, provenance
from lens_attn.metrics import MetricFn, MetricName, check_metric, per_prompt
from lens_attn.probes import Probe

AttributionMethod = Literal["zero", "mean"]


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
        progress: show a tqdm progress bar.

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
    for lo in tqdm(starts, disable=not progress, desc="attribution"):
        hi = min(lo + batch_size, n_prompts)
        values, effect = _one_batch(model, batch, lo, hi, metric, method, ref, qk_fix)
        baseline[lo:hi] = values
        estimate[:, :, lo:hi] = effect
    units = [[(layer, head)] for layer in layers for head in range(n_heads)]
    ablated = baseline[None] + estimate.reshape(n_layers * n_heads, n_prompts)
    info = provenance(model, probes, batch_size=batch_size, qk_fix=qk_fix)
    return AblationResult(
        units, baseline, ablated, n_layers, n_heads, method, metric_name, True, info
    )


def _one_batch(
    model, batch, lo: int, hi: int, metric, method: str, ref, qk_fix: bool = False
) -> tuple[Float[Tensor, " batch"], Float[Tensor, "layer head_index batch"]]:
    """Clean metric per prompt and the linear estimate of every head's delta, prompts ``lo:hi``."""
    device = model.cfg.device
    tokens, mask = batch.tokens[lo:hi].to(device), batch.mask[lo:hi].to(device)
    clean: dict[int, Tensor] = {}
    probes: dict[int, Tensor] = {}

    def tap(layer):
        def hook(z, hook):
            # z + 0 with a leaf "0": d metric / d leaf is the total derivative wrt this layer's z,
            # whether or not the model's parameters require grad, and their .grad stays untouched.
            probes[layer] = torch.zeros_like(z, requires_grad=True)
            clean[layer] = z.detach()
            return z + probes[layer]

        return hook

    hooks = [(utils.get_act_name("z", layer), tap(layer)) for layer in range(model.cfg.n_layers)]
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
            hooks.append((utils.get_act_name("resid_pre", layer), keep_resid(layer)))
            hooks.append((utils.get_act_name("pattern", layer), tap_pattern(layer)))
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


@torch.no_grad()
def _pattern_from(attn, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rotary ``q``, ``k`` (query heads) and the causal pattern of ``attn`` on normalised input ``x``."""
    q, k, _ = attn.calculate_qkv_matrices(x, x, x)
    q = attn.apply_rotary(q, 0, mask.long())
    k = attn.apply_rotary(k, 0, mask.long())
    repeat = q.shape[2] // k.shape[2]  # GQA: query heads per key/value head
    k = k.repeat_interleave(repeat, dim=2) if repeat > 1 else k
    q, k = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3)  # [batch, head_index, pos, d_head]
    return q, k, _softmax_causal(q @ k.transpose(-1, -2) / attn.attn_scale, mask)


def _softmax_causal(scores: Tensor, mask: Tensor) -> Tensor:
    n = scores.shape[-1]
    visible = (
        torch.ones(n, n, dtype=torch.bool, device=scores.device).tril() & mask[:, None, None, :]
    )
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)


@torch.no_grad()
def _qk_correction(
    model, layer: int, dz: Tensor, resid: dict, pattern_grads: dict, mask: Tensor
) -> Tensor:
    """Per head of ``layer``: (exact - linear) change of every later layer's pattern through its
    queries and keys, times that pattern's gradient. ``dz`` is ``z_ablated - z`` ``[batch, pos, head, d_head]``."""
    w_o = model.blocks[layer].attn.W_O  # [head_index, d_head, d_model]
    out = torch.zeros(dz.shape[2], dz.shape[0], device=dz.device)  # [head_index, batch]
    for later in range(layer + 1, model.cfg.n_layers):
        block = model.blocks[later]
        x = block.ln1(resid[later])
        q, k, p = _pattern_from(block.attn, x, mask)
        grad = pattern_grads[later]
        for head in range(dz.shape[2]):
            delta = torch.einsum("bpd,dm->bpm", dz[:, :, head], w_o[head])  # residual change
            q2, k2, p2 = _pattern_from(block.attn, block.ln1(resid[later] + delta), mask)
            dscores = (
                (q2 - q) @ k.transpose(-1, -2) + q @ (k2 - k).transpose(-1, -2)
            ) / block.attn.attn_scale
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
