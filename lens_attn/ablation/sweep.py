"""Measure a metric with every head (or layer, or group) ablated in turn, many ablations per pass.

    >>> probes = lens_attn.induction_probes(model, n_per_period=4)
    >>> result = lens_attn.ablation_sweep(model, probes, metric="induction_loss", progress=False)
    >>> list(result.to_dataframe().columns)
    ['unit', 'layer', 'head', 'baseline', 'ablated', 'delta', 'stderr']
    >>> result.grid().shape            # [layer, head_index] of deltas, NaN where not ablated
    torch.Size([4, 8])

The methods and the single-ablation context manager are in ``lens_attn.ablation.methods``.

The sweep is batched: the prompts are repeated once per ablation ("variant") along the batch, and
one hook per layer applies a ``[variants * batch, head_index]`` mask, so many ablations share one
forward pass (chunked by ``max_batch`` rows and ``memory_budget_mb``; prompts are grouped by length
so a pass is little padding). It also skips work that an ablation cannot change (``reuse_prefix``),
one of two ways per sweep, on a ``HookedTransformer`` and a ``TransformerBridge`` alike:

- ``replay``: ``zero``, ``mean``, ``resample`` and ``patch`` replace the ablated heads' ``hook_z``
  with a value known in advance, so a pass starts from the clean run's ``blocks.L.hook_resid_mid``
  of the units' first ablated layer ``L`` plus ``(z_ablated - z) @ W_O``; the layers after it run
  unhooked through ``lens_attn.ablation.replay`` (fused attention kernel; a unit's heads in later
  layers get their ablated ``z`` there), the last one only at the positions the metric reads;
- ``resume`` (``bos``, ``uniform``, blocks ``replay`` can't reproduce, hooks attached, left
  padding): the pass starts at ``L`` from the clean ``blocks.L.hook_resid_pre``
  (``start_at_layer``), hooked. A TransformerLens 3.9 bridge has no ``start_at_layer``: ``full``.

Which path ran, and why not ``replay`` in one line, is in ``AblationResult.provenance["path"]`` and
``["path_reason"]``; ``verbose=True`` prints it (e.g. a GPT-2 bridge: "replay can't reproduce this
model's blocks: no rotary attention ...").

Either way the unembedding runs only on the positions the metric reads (``induction_loss`` reads
the second copy only).

``direct=True`` measures a unit's *direct* effect instead: its heads' changed output is taken out of
the final residual stream only (``(z_ablated - z) @ W_O`` added to the clean
``blocks.<last>.hook_resid_post``), and the later layers keep reading the clean output. That is
the path a copying head's claim is about (its OV circuit writes the attended token into the
logits); it costs one clean run and an unembedding per unit (path ``direct``).

Speed. On a GPU, stacking ablations along the batch is the win. On a CPU it is not: the cost per
batch row is flat or rising with the batch size, so the gain there comes from skipping work.
``experiments/bench_ablation.py`` measures it side by side with a naive loop of ``run_with_hooks``
on the bundled checkpoint (1 thread, 2026-12-03): stacking alone 1.3-1.6x, the ``replay`` path
4.1x on the idle machine (3.0x with a test run beside it; 2.2x with ``--metric loss``). What
remains is compute an exact sweep can't skip: the MLPs (40% of the time) from the ablated layer
on, the later attention, and the unembedding of the measured positions.
"""

import functools
from collections.abc import Sequence
from typing import Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from transformer_lens.utilities import get_act_name
from transformer_lens.utilities.activation_functions import apply_softcap

from lens_attn import compat, distributed
from lens_attn.ablation import replay
from lens_attn.ablation.inputs import MetricInputs, bytes_per_row, prepare
from lens_attn.ablation.methods import (
    AblationMethod,
    ablation_hook,
    ablation_hook_name,
    build_reference,
    check_method,
)
from lens_attn.ablation.metrics import MetricFn, MetricName, check_metric
from lens_attn.ablation.result import AblationResult, provenance
from lens_attn.heads import SweepUnits, sweep_units
from lens_attn.probes import Probe
from lens_attn.progress import progress_bar

_OUTPUT_METHODS = ("zero", "mean", "resample", "patch")  # replace hook_z: the new output is known
SweepPath = Literal["full", "resume", "replay", "direct"]


def _sweep_path(model, method: str, mask: Tensor, reuse_prefix: bool) -> tuple[SweepPath, str]:
    """How each pass of a sweep runs (module docstring, "Speed"), and why not a faster one.

    ``full``: the whole model with hooks. ``resume``: from the clean ``resid_pre`` of the first
    ablated layer, with hooks. ``replay``: from the clean ``resid_mid`` of the first ablated layer
    with the heads' changed output added, the rest unhooked through ``lens_attn.ablation.replay``.
    The reason is ``""`` for ``replay`` and one line otherwise.
    """
    if not reuse_prefix:
        return "full", "reuse_prefix=False"
    if method not in _OUTPUT_METHODS:
        why = f"method={method!r} does not replace hook_z by a value known in advance"
    elif (blocker := replay.replay_blocker(model)) is not None:
        why = f"replay can't reproduce this model's blocks: {blocker}"
    elif replay.has_hooks(model):
        why = "the model has hooks attached, which replay would skip"
    elif not replay.is_right_padded(mask):
        why = "the prompts are not right-padded"
    else:
        return "replay", ""
    if compat.can_start_at_layer(model):
        return "resume", why
    return "full", why + f"; and {type(model).__name__} here has no start_at_layer to resume from"


def _clean_sites(path: SweepPath, starts: Sequence[int], n_layers: int) -> list[str]:
    """Hook names the clean run keeps for ablated passes that start at layers ``starts``
    (``direct``: the layers whose heads are ablated)."""
    if path == "direct":
        return [get_act_name("z", layer) for layer in starts] + [
            get_act_name("resid_post", n_layers - 1)
        ]
    if path == "replay":
        return [get_act_name(site, layer) for layer in starts for site in ("resid_mid", "z")]
    if path == "resume":
        return [get_act_name("resid_pre", layer) for layer in starts if layer > 0]
    return []


def ablation_sweep(
    model,
    tokens_or_probes: "list[str] | list[Probe] | Tensor | None",
    *,
    method: AblationMethod = "zero",
    metric: MetricName | MetricFn = "loss",
    heads: "SweepUnits | Sequence | None" = None,
    reference: "list[str] | list[Probe] | Tensor | None" = None,
    answer_tokens=None,
    kv_group: bool = False,
    max_batch: int | None = None,
    memory_budget_mb: int | float = 1024,
    seed: int = 0,
    reuse_prefix: bool = True,
    direct: bool = False,
    process_group=None,
    progress: bool = False,
    verbose: bool = False,
) -> AblationResult:
    """Measure ``metric`` with each unit of heads ablated, many units per forward pass.

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge`` in compatibility mode.
        tokens_or_probes: prompts, ``Probe`` objects, a ``[batch, pos]`` token tensor, or ``None``
            for the built-in probes. Right-padded into one batch; the metric ignores padding.
        method: ``zero, mean, resample, bos, uniform, patch`` (module docstring). ``patch``:
            activation patching, each input row run with the units' ``hook_z`` from the same row
            of ``reference`` (``ablation_sweep(model, corrupted, method="patch",
            reference=clean)``; per position: :mod:`lens_attn.ablation.patching`).
        metric: ``loss, induction_loss, logit_diff, accuracy`` or ``fn(logits, tokens) -> scalar``
            (``lens_attn.ablation.metrics``).
        heads: ``None`` or ``"heads"``: every head alone; ``"layers"``: every layer (all its heads
            at once); ``"kv_groups"``: every key/value group; or a list whose items are each one
            unit: a head (``"L1H3"``, ``(1, 3)``, ``(1, 3, score)`` from ``HeadScores.top``), a
            layer (``"L1"``) or a list of heads ablated together.
        reference: prompts whose ``hook_z`` ``mean``/``resample``/``patch`` use (required for
            those methods). For ``patch``, as many prompts as the input, each with as many real
            tokens as its input row (ValueError otherwise).
        answer_tokens: ``(correct, incorrect)`` ids or single-token strings (or ``[batch, 2]`` ids)
            for ``metric="logit_diff"``; ``None`` takes each probe's own ``answers`` (``ioi_probes``).
        kv_group: expand every unit to the whole key/value groups of its heads.
        max_batch: most rows (ablations x prompts) in one forward pass. ``None``: about 4096
            tokens per pass on a CPU, where bigger passes spill out of the caches and cost more
            per row (measured on the bundled model: 32 rows of 83 tokens ran 1.5x faster per row
            than 256), and 64k tokens on an accelerator.
        memory_budget_mb: rough memory cap of one forward pass; lowers the rows per pass further.
        seed: seed of the ``resample`` draw.
        reuse_prefix: start each pass at the first ablated layer from the clean residual stream,
            and replay the rest unhooked where it can (module docstring). The result is the same
            to float rounding; it only saves compute.
        direct: ablate each unit on the direct path to the logits only (module docstring): the
            final residual stream loses the heads' changed output, later layers see the clean one.
            Needs a method that replaces ``hook_z``: ``zero, mean, resample, patch``.
        process_group: a ``torch.distributed`` group to shard the prompts over (``None``: the
            default group if one is initialised or ``torchrun`` started this process). Each rank
            measures its prompts ``[rank::world_size]``; the per-prompt values are summed over the
            ranks (each prompt filled by exactly one), so every rank returns the single-process result.
        progress: report progress over forward passes (``lens_attn.progress``).
        verbose: print which path the passes take and, when not ``replay``, why (also in
            ``result.provenance["path"]`` and ``["path_reason"]``).
    """
    check_method(method)
    metric_name = check_metric(metric)
    if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
        raise ValueError(f"max_batch must be a positive integer or None, got {max_batch!r}")
    if memory_budget_mb <= 0:
        raise ValueError(f"memory_budget_mb must be positive, got {memory_budget_mb!r}")
    if direct and method not in _OUTPUT_METHODS:
        raise ValueError(
            f"direct=True takes the heads' changed output out of the logits' path, which needs a "
            f"method that replaces hook_z ({', '.join(_OUTPUT_METHODS)}); got {method!r}"
        )
    units = sweep_units(model, heads, kv_group=kv_group)
    probes, batch = prepare(model, tokens_or_probes, metric, answer_tokens)
    ref = build_reference(
        model, method, reference, sorted({layer for u in units for layer, _ in u})
    )
    if method == "patch":
        check_paired(batch.mask, ref)

    n_prompts, n_pos = batch.tokens.shape
    path, why = ("direct", "") if direct else _sweep_path(model, method, batch.mask, reuse_prefix)
    if verbose:
        print(f"ablation_sweep: path {path}" + (f" ({why})" if why else ""))
    n_unembed = n_pos - batch.first_needed(metric) if path != "full" else n_pos
    budget_rows = int(memory_budget_mb * 2**20 // bytes_per_row(model.cfg, n_pos, n_unembed))
    clean_rows = int(memory_budget_mb * 2**20 // bytes_per_row(model.cfg, n_pos))  # full logits
    if max_batch is None:
        tokens = 4096 if torch.device(model.cfg.device).type == "cpu" else 65536
        max_batch = max(1, tokens // n_pos)
    rows = max(1, min(max_batch, budget_rows))  # batch rows per forward pass
    if path == "direct":  # every unit in one group of passes, from the same clean sites
        start = [0] * len(units)
        sites = sorted({layer for u in units for layer, _ in u})
    else:
        start = [min(layer for layer, _ in u) if path != "full" else 0 for u in units]
        sites = sorted(set(start))
    by_start: dict[int, list[int]] = {}
    for i, layer in enumerate(start):
        by_start.setdefault(layer, []).append(i)
    group = distributed.current_group(process_group, device=model.cfg.device)
    mine = torch.tensor(distributed.shard(list(range(n_prompts)), group), dtype=torch.long)
    chunk_size = max(1, min(len(mine), rows, clean_rows))  # the clean run unembeds every position
    chunks = [mine[c] for c in _length_chunks(batch.mask.sum(1)[mine], chunk_size)]
    plans = []  # per prompt chunk: groups of units sharing one pass (and one start layer)
    for idx in chunks:
        variants = max(1, rows // len(idx))  # ablations per forward pass
        plans.append([ids[k : k + variants] for ids in by_start.values()
                      for k in range(0, len(ids), variants)])  # fmt: skip

    baseline = torch.zeros(n_prompts)  # zeros: the other ranks' prompts add in below
    ablated = torch.zeros(len(units), n_prompts)
    bar = progress_bar(total=sum(map(len, plans)), desc="ablation", unit="pass", enabled=progress)
    try:
        for idx, plan in zip(chunks, plans, strict=True):
            chunk = batch.select(idx)
            chunk_ref = ref.select(idx) if method == "patch" and ref is not None else ref
            logits, clean = clean_run(model, chunk, _clean_sites(path, sites, model.cfg.n_layers))
            baseline[idx] = chunk.measure(metric, logits)
            del logits
            for ids in plan:
                chosen = [units[i] for i in ids]
                if path == "direct":
                    values = _direct_run(model, chunk, chosen, clean, method, chunk_ref, seed,
                                         metric)  # fmt: skip
                elif path == "replay":
                    values = _replayed_run(model, chunk, chosen, start[ids[0]], clean, method,
                                           chunk_ref, seed, metric)  # fmt: skip
                else:
                    values = _variant_run(model, chunk, chosen, start[ids[0]], clean, method,
                                          chunk_ref, seed, metric, path)  # fmt: skip
                ablated[torch.tensor(ids)[:, None], idx[None, :]] = values.reshape(len(ids), -1)
                bar.update(1)
    finally:
        bar.close()
    if group is not None:
        merged = distributed.all_reduce_sum({"baseline": baseline, "ablated": ablated}, group,
                                            device=distributed.collective_device(group))  # fmt: skip
        baseline, ablated = merged["baseline"].cpu(), merged["ablated"].cpu()
    info = provenance(model, probes, seed=seed, max_batch=max_batch, rows_per_pass=rows,
                      path=path, path_reason=why,
                      world_size=distributed.world_size(group))  # fmt: skip
    return AblationResult(units, baseline, ablated, model.cfg.n_layers, model.cfg.n_heads, method,
                          metric_name, provenance=info)  # fmt: skip


def check_paired(mask: Tensor, ref) -> None:
    """``patch`` pairs input row i with reference row i: same prompt count, same real lengths."""
    if ref is None:  # no units, so nothing is patched
        return
    theirs = ref.mask.cpu()
    if theirs.shape[0] != mask.shape[0] or not torch.equal(theirs.sum(1), mask.sum(1)):
        raise ValueError(
            "method='patch' runs input row i with the head outputs of reference row i, so both "
            "need the same number of prompts and the same number of tokens per prompt; got "
            f"input lengths {mask.sum(1).tolist()} and reference lengths {theirs.sum(1).tolist()}"
        )


def _length_chunks(lengths: Tensor, size: int, waste: float = 1.25) -> list[Tensor]:
    """Prompt indices in chunks of at most ``size``, by length, so little of a pass is padding.

    A chunk is closed before a prompt that would make its padded area exceed ``waste`` times its
    real tokens (each chunk is padded only to its own longest prompt).
    """
    chunks, current, real = [], [], 0
    for i in torch.argsort(lengths, stable=True).tolist():
        n = int(lengths[i])
        if current and (len(current) == size or (len(current) + 1) * n > waste * (real + n)):
            chunks.append(torch.tensor(current))
            current, real = [], 0
        current.append(i)
        real += n
    chunks.append(torch.tensor(current))
    return chunks


@torch.no_grad()
def clean_run(model, chunk: MetricInputs, sites: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
    """Clean logits, and the activations at hook points ``sites`` to start ablated passes from."""
    kept: dict[str, Tensor] = {}
    device = model.cfg.device
    logits = model.run_with_hooks(
        chunk.tokens.to(device),
        attention_mask=chunk.mask.long().to(device),
        fwd_hooks=[(name, keep_as(kept, name)) for name in sites],
    )
    return logits, kept


def keep_as(kept: dict[str, Tensor], name: str):
    """A hook storing its activation in ``kept[name]``: under the name asked for, since on a
    ``TransformerBridge`` ``hook.name`` is the hook's own name (``blocks.1.hook_in`` for the alias
    ``blocks.1.hook_resid_pre``)."""

    def keep(act, hook):
        kept[name] = act.detach()

    return keep


def _head_masks(units, n_layers: int, n_heads: int) -> Bool[Tensor, "variant layer head_index"]:
    masks = torch.zeros(len(units), n_layers, n_heads, dtype=torch.bool)
    for v, unit in enumerate(units):
        for layer, head in unit:
            masks[v, layer, head] = True
    return masks


@torch.no_grad()
def _variant_run(
    model, chunk: MetricInputs, units, start: int, clean, method, ref, seed, metric, path: SweepPath
) -> Tensor:
    """``len(units)`` ablations stacked along the batch, one hooked pass; metric ``[variant * batch]``.

    ``path="resume"`` (a ``HookedTransformer``; a ``TransformerBridge`` on TransformerLens 4) starts
    the pass at layer ``start`` from the clean residual stream and (``HookedTransformer``) unembeds
    only the positions the metric reads; ``"full"`` runs everything.
    """
    n_layers, base = model.cfg.n_layers, chunk.tokens.shape[0]
    masks = _head_masks(units, n_layers, model.cfg.n_heads)
    hooks = []
    for layer in range(n_layers):
        if masks[:, layer].any():
            hook = ablation_hook(method, layer, _rows(masks, layer, base), base, ref, seed)
            hooks.append((ablation_hook_name(method, layer), hook))
    stacked = chunk.repeat(len(units))
    device = model.cfg.device
    attention_mask = stacked.mask.long().to(device)
    if path == "full":
        logits = model.run_with_hooks(
            stacked.tokens.to(device), attention_mask=attention_mask, fwd_hooks=hooks
        )
        return stacked.measure(metric, logits)
    if start > 0:
        x = clean[get_act_name("resid_pre", start)].repeat(len(units), 1, 1)
    else:
        x = stacked.tokens.to(device)
    if not compat.is_hooked(model):  # a TransformerBridge (4.x) never stops at n_layers: logits
        logits = model.run_with_hooks(
            x, start_at_layer=start if start > 0 else None, attention_mask=attention_mask,
            fwd_hooks=hooks,
        )  # fmt: skip
        return stacked.measure(metric, logits)
    lo = stacked.first_needed(metric)
    final = model.run_with_hooks(
        x, start_at_layer=start if start > 0 else None, stop_at_layer=n_layers,
        attention_mask=attention_mask, fwd_hooks=hooks,
    )  # fmt: skip  # [variant * batch, pos, d_model], before ln_final
    return _measure_from(model, stacked, final[:, lo:], lo, metric)


@torch.no_grad()
def _replayed_run(
    model, chunk: MetricInputs, units, layer: int, clean, method, ref, seed, metric
) -> Tensor:
    """Ablations by the heads' output (``zero, mean, resample, patch``) whose first layer is
    ``layer``, stacked.

    The ablated heads change ``hook_z`` only, so the residual stream after ``layer``'s attention is
    the clean ``resid_mid`` plus ``(z_ablated - z) @ W_O``; from there ``replay.run_from`` runs the
    rest unhooked, replacing the ablated heads' ``z`` in later layers as the hook would, the last
    layer only at the positions the metric reads.
    """
    n_layers, base = model.cfg.n_layers, chunk.tokens.shape[0]
    masks = _head_masks(units, n_layers, model.cfg.n_heads)
    resid = clean[get_act_name("resid_mid", layer)].repeat(len(units), 1, 1)
    resid = resid + _output_change(model, clean, layer, masks, method, ref, seed)
    later = {  # the hook_z each later ablated layer gets, as its hook would give it
        i: functools.partial(
            ablation_hook(method, i, _rows(masks, i, base), base, ref, seed), hook=None
        )
        for i in range(layer + 1, n_layers)
        if masks[:, i].any()
    }
    stacked = chunk.repeat(len(units))
    lo = stacked.first_needed(metric)
    final = replay.run_from(model, resid, layer, at="resid_mid", query_from=lo, edit_z=later)
    return _measure_from(model, stacked, final, lo, metric)


def _rows(masks, layer: int, base: int) -> Bool[Tensor, "variant_batch head_index"]:
    """Each variant's ablated heads of ``layer``, one row per stacked prompt."""
    return masks[:, layer].repeat_interleave(base, dim=0)


@torch.no_grad()
def _direct_run(model, chunk: MetricInputs, units, clean, method, ref, seed, metric) -> Tensor:
    """Direct effects of ``len(units)`` ablations, stacked: the clean final residual stream plus
    each ablated layer's ``(z_ablated - z) @ W_O``, unembedded at the positions the metric reads."""
    n_layers = model.cfg.n_layers
    masks = _head_masks(units, n_layers, model.cfg.n_heads)
    final = clean[get_act_name("resid_post", n_layers - 1)]
    resid = final.repeat(len(units), 1, 1)  # [variant * batch, pos, d_model]
    for layer in range(n_layers):
        if masks[:, layer].any():
            change = _output_change(model, clean, layer, masks, method, ref, seed)
            resid = resid + change.to(resid.device)  # layers may sit on different devices
    stacked = chunk.repeat(len(units))
    lo = stacked.first_needed(metric)
    return _measure_from(model, stacked, resid[:, lo:], lo, metric)


def _output_change(
    model, clean, layer: int, masks, method, ref, seed
) -> Float[Tensor, "variant_batch pos d_model"]:
    """What ablating each variant's heads of ``layer`` (``masks[:, layer]``) adds to the residual
    stream there: ``(z_ablated - z) @ W_O`` from the clean ``hook_z``, 0 where no head is ablated."""
    z = clean[get_act_name("z", layer)]  # [batch, pos, head_index, d_head]
    n_variants, base = masks.shape[0], z.shape[0]
    z = z.repeat(n_variants, 1, 1, 1)
    dz = ablation_hook(method, layer, _rows(masks, layer, base), base, ref, seed)(z, None) - z
    w_o = model.blocks[layer].attn.W_O  # [head_index, d_head, d_model]
    return torch.einsum("bphd,hdm->bpm", dz, w_o)


def _measure_from(model, stacked: MetricInputs, final: Tensor, lo: int, metric) -> Tensor:
    """The metric from the last residual stream at positions ``lo..`` (before ``ln_final``)."""
    logits = replay.unembed(model, model.ln_final(final))  # both act per position
    logits = apply_softcap(logits, model.cfg.output_logits_soft_cap)  # as HookedTransformer does
    return stacked.cut(lo).measure(metric, logits)
