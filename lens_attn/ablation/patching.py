"""Activation patching of attention heads at every position: each (layer, pos, head) in turn.

    >>> clean = model.to_tokens(["one two three four one two three four"])
    >>> corrupted = clean.clone()
    >>> corrupted[:, 2] = clean[:, 3]                       # one token changed, same shape
    >>> result = patch_heads_by_pos(model, corrupted, clean, metric="loss")
    >>> result.values.shape == (model.cfg.n_layers, clean.shape[1], model.cfg.n_heads)
    True

Each pass runs the ``corrupted`` prompts with one head's output (``hook_z``) at one position taken
from the same row of the ``clean`` run, and measures ``metric`` on the result. This is
TransformerLens's ``patching.get_act_patch_attn_head_out_by_pos`` (whose ``patching_metric`` is a
function of the whole batch's logits; here the metric is per prompt, and ``values`` is its mean).
Patching every position at once, per head, is ``ablation_sweep(model, corrupted, method="patch",
reference=clean)`` (``get_act_patch_attn_head_out_all_pos``).

``hook_z`` is per query head on both backends, also under grouped-query attention, so a patch
replaces one query head's output and leaves the heads sharing its key/value head alone. Many
(pos, head) patches share one forward pass, stacked along the batch; on a model that can start at a
layer (``HookedTransformer``; ``TransformerBridge`` on TransformerLens 4) a pass starts at the
patched layer from the corrupted run's ``hook_resid_pre``.
"""

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.utilities import get_act_name

from lens_attn.ablation.inputs import MetricInputs, prepare
from lens_attn.ablation.methods import Reference
from lens_attn.ablation.metrics import MetricFn, MetricName, check_metric
from lens_attn.ablation.sweep import check_paired, clean_run
from lens_attn.compat import can_start_at_layer
from lens_attn.heads import head_label
from lens_attn.progress import progress_bar


@dataclass
class PatchingResult:
    """The metric with each (layer, pos, head) patched, per prompt; ``baseline``: nothing patched."""

    patched_per_prompt: Float[Tensor, "layer pos head_index prompt"]
    baseline_per_prompt: Float[Tensor, " prompt"]
    metric: str

    @property
    def values(self) -> Float[Tensor, "layer pos head_index"]:
        """The metric under each patch, mean over prompts (TransformerLens's ``_by_pos`` order)."""
        return self.patched_per_prompt.mean(-1)

    @property
    def baseline(self) -> float:
        return float(self.baseline_per_prompt.mean())

    @property
    def delta(self) -> Float[Tensor, "layer pos head_index"]:
        """``values - baseline``: what patching each (layer, pos, head) changes."""
        return self.values - self.baseline

    def to_dataframe(self):
        """One row per patch: ``unit`` (``"L1H3"``), ``layer, pos, head, patched, delta``."""
        import pandas as pd

        n_layers, n_pos, n_heads = self.values.shape
        grid = torch.meshgrid(
            torch.arange(n_layers), torch.arange(n_pos), torch.arange(n_heads), indexing="ij"
        )
        layer, pos, head = (g.flatten().tolist() for g in grid)
        return pd.DataFrame({
            "unit": [head_label(ly, h) for ly, h in zip(layer, head, strict=True)],
            "layer": layer, "pos": pos, "head": head,
            "patched": self.values.flatten().tolist(), "delta": self.delta.flatten().tolist(),
        })  # fmt: skip


@torch.no_grad()
def patch_heads_by_pos(
    model,
    corrupted,
    clean,
    *,
    metric: MetricName | MetricFn = "loss",
    answer_tokens=None,
    max_batch: int | None = None,
    progress: bool = False,
) -> PatchingResult:
    """Patch each head's ``hook_z`` at each position from ``clean`` into ``corrupted``, one at a time.

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge`` in compatibility mode.
        corrupted: prompts, probes or a ``[batch, pos]`` token tensor: the run that is patched.
        clean: the same kind of input with as many prompts, each as long as its ``corrupted`` row
            (ValueError otherwise): where the patched head outputs come from.
        metric: as for ``ablation_sweep`` (``loss, induction_loss, logit_diff, accuracy`` or a
            per-prompt callable).
        answer_tokens: ``(correct, incorrect)`` for ``metric="logit_diff"``.
        max_batch: most rows (patches x prompts) in one forward pass; ``None``: about 4096 tokens.
        progress: report progress over forward passes (``lens_attn.progress``).
    """
    metric_name = check_metric(metric)
    _, batch = prepare(model, corrupted, metric, answer_tokens)
    n_prompts, n_pos = batch.tokens.shape
    cfg = model.cfg
    layers = list(range(cfg.n_layers))
    ref = Reference.build(model, clean, layers, keep_z=True)
    check_paired(batch.mask, ref)
    if max_batch is None:
        max_batch = max(1, 4096 // n_pos)
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be a positive integer or None, got {max_batch!r}")
    variants = max(1, max_batch // n_prompts)  # patches per forward pass

    resume = can_start_at_layer(model)
    sites = [get_act_name("resid_pre", layer) for layer in layers[1:]] if resume else []
    logits, kept = clean_run(model, batch, sites)  # the corrupted run, from which patches resume
    tokens, mask = batch.tokens.to(cfg.device), batch.mask.long().to(cfg.device)
    baseline = batch.measure(metric, logits)
    del logits

    pairs = [(pos, head) for pos in range(n_pos) for head in range(cfg.n_heads)]
    patched = torch.zeros(cfg.n_layers, n_pos, cfg.n_heads, n_prompts)
    bar = progress_bar(total=cfg.n_layers * -(-len(pairs) // variants), desc="patching",
                       unit="pass", enabled=progress)  # fmt: skip
    try:
        for layer in layers:
            clean_z = ref.paired_z(layer, n_pos, n_prompts)  # [prompt, pos, head_index, d_head]
            for k in range(0, len(pairs), variants):
                group = pairs[k : k + variants]
                values = _patched_run(model, batch, tokens, mask, layer, group, clean_z,
                                      kept if resume and layer > 0 else None, metric)  # fmt: skip
                for (pos, head), row in zip(group, values.reshape(len(group), -1), strict=True):
                    patched[layer, pos, head] = row
                bar.update(1)
    finally:
        bar.close()
    return PatchingResult(patched, baseline, metric_name)


def _patched_run(
    model, batch: MetricInputs, tokens, mask, layer: int, group, clean_z: Tensor, kept, metric
) -> Tensor:
    """One pass with ``len(group)`` patches stacked along the batch; metric ``[patch * prompt]``."""
    n_prompts, n_pos = batch.tokens.shape
    where = torch.zeros(len(group), n_pos, model.cfg.n_heads, dtype=torch.bool)
    for v, (pos, head) in enumerate(group):
        where[v, pos, head] = True
    where = where.repeat_interleave(n_prompts, dim=0)[..., None]  # [patch * prompt, pos, head, 1]
    source = clean_z.repeat(len(group), 1, 1, 1)

    def patch(z, hook):  # z: [patch * prompt, pos, head_index, d_head]
        return torch.where(where.to(z.device), source.to(z.device, z.dtype), z)

    hooks = [(get_act_name("z", layer), patch)]
    stacked = batch.repeat(len(group))
    attention_mask = mask.repeat(len(group), 1)
    if kept is None:
        logits = model.run_with_hooks(
            tokens.repeat(len(group), 1), attention_mask=attention_mask, fwd_hooks=hooks
        )
    else:  # from the corrupted residual stream before the patched layer
        resid = kept[get_act_name("resid_pre", layer)].repeat(len(group), 1, 1)
        logits = model.run_with_hooks(
            resid, start_at_layer=layer, attention_mask=attention_mask, fwd_hooks=hooks
        )
    return stacked.measure(metric, logits)
