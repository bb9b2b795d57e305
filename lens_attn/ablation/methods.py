"""Knock out attention heads: the methods, and one ablation as a context manager or hooks.

    >>> with lens_attn.ablate(model, ["L1H3", (2, 0)], method="zero"):
    ...     logits = model(tokens)
    >>> logits = model.run_with_hooks(tokens, fwd_hooks=list(lens_attn.ablate(model, ["L1H3"])))
    >>> probes = lens_attn.induction_probes(model)
    >>> result = lens_attn.ablation_sweep(model, probes, metric="induction_loss")
    >>> result.to_dataframe()          # layer, head, baseline, ablated, delta, stderr
    >>> result.grid()                  # [layer, head_index] of deltas, NaN where not ablated

Methods (``AblationMethod``), each applied to the chosen query heads only:

=============  ==============================  ===================================================
method         hook point                      what the head does instead
=============  ==============================  ===================================================
``zero``       ``hook_z``                      outputs 0 (``b_O`` is zero in Llama, so the head
                                               contributes nothing)
``mean``       ``hook_z``                      outputs its mean over the ``reference`` prompts at
                                               the same position (padding-aware mean)
``resample``   ``hook_z``                      outputs what it output on a reference prompt drawn
                                               with a seeded generator (the same draw for every
                                               ablation in one call)
``bos``        ``hook_pattern``                attends only to ``key_pos`` 0 (BOS, as prompts are
                                               right-padded with BOS first)
``uniform``    ``hook_attn_scores``            attends uniformly to every visible key: scores of
                                               the unmasked (causal, real) keys are set to 0 before
                                               the softmax, so the pattern is ``1 / n_visible``
=============  ==============================  ===================================================

``hook_z`` ``[batch, pos, head_index, d_head]``, ``hook_pattern`` and ``hook_attn_scores``
``[batch, head_index, query_pos, key_pos]`` are per *query* head in TransformerLens, also under
grouped-query attention (keys and values are ``repeat_interleave``-d to the query heads before the
pattern), so ablating one query head leaves the heads that share its key/value head untouched. To
knock out a whole key/value group, pass ``groups=[(layer, kv_head)]`` or ``kv_group=True`` (every
given head expands to the query heads reading its key/value head ``h // (n_heads // n_kv_heads)``).

Many ablations at once, each measured with a metric: ``lens_attn.sweep.ablation_sweep``.
"""

import math
import numbers
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from transformer_lens import utils

from lens_attn.errors import InputError
from lens_attn.metrics import per_prompt, repeat_period
from lens_attn.metrics import resolve_answer_tokens as _answers
from lens_attn.patterns import _pad_id
from lens_attn.probes import Probe, as_probes, check_context, pad, probe_hash
from lens_attn.results import head_label, load_json, nan_for_null, parse_head, save_table_and_json

AblationMethod = Literal["zero", "mean", "resample", "bos", "uniform"]
METHODS: tuple[str, ...] = get_args(AblationMethod)
_SITE = {"zero": "z", "mean": "z", "resample": "z", "bos": "pattern", "uniform": "attn_scores"}
SweepUnits = Literal["heads", "layers", "kv_groups"]
Head = tuple[int, int]


def check_method(method: str, valid: Sequence[str] = METHODS) -> str:
    if method not in valid:
        raise ValueError(f"unknown ablation method {method!r}; valid: {', '.join(valid)}")
    return method


# ------------------------------------------------------------------------------------------- heads


def _kv_size(model) -> int:
    """Query heads per key/value head (1 without GQA)."""
    n_kv = getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads
    return model.cfg.n_heads // n_kv


def _group_heads(model, layer: int, kv_head: int) -> list[Head]:
    size = _kv_size(model)
    n_kv = model.cfg.n_heads // size
    if not 0 <= layer < model.cfg.n_layers or not 0 <= kv_head < n_kv:
        raise ValueError(
            f"kv group ({layer}, {kv_head}) out of range; "
            f"valid layers 0..{model.cfg.n_layers - 1}, "
            f"kv_head 0..{n_kv - 1}"
        )
    return [(layer, h) for h in range(kv_head * size, (kv_head + 1) * size)]


def _parse_one(model, spec) -> list[Head]:
    """One spec -> heads: ``"L1H3"``, ``(1, 3)``, ``(1, 3, score)``, or ``"L1"`` (a layer)."""
    cfg = model.cfg
    if isinstance(spec, str) and spec.strip().upper()[1:].isdigit() and spec.strip()[0] in "lL":
        layer = int(spec.strip()[1:])
        if not 0 <= layer < cfg.n_layers:
            raise ValueError(f"layer {spec!r} out of range; valid layers 0..{cfg.n_layers - 1}")
        return [(layer, h) for h in range(cfg.n_heads)]
    if isinstance(spec, (tuple, list)) and len(spec) == 3 and isinstance(spec[2], float):
        spec = tuple(spec[:2])  # (layer, head, value) as HeadScores.top returns
    readable = isinstance(spec, str) or (
        isinstance(spec, (tuple, list)) and len(spec) == 2 and all(_is_int(x) for x in spec)
    )
    if not readable:
        raise InputError(
            f"cannot read head {spec!r}; write heads as (layer, head) or 'L<layer>H<head>' "
            f"(a sweep also takes {', '.join(get_args(SweepUnits))})"
        )
    if not isinstance(spec, str):
        spec = (int(spec[0]), int(spec[1]))
    return [parse_head(spec, cfg.n_layers, cfg.n_heads)]


def _is_int(x) -> bool:
    if isinstance(x, bool) or (isinstance(x, Tensor) and x.dtype == torch.bool):
        return False  # (True, 1) is not a head
    return isinstance(x, numbers.Integral) or (
        isinstance(x, Tensor) and x.ndim == 0 and not x.is_floating_point()
    )


def _is_single(spec) -> bool:
    return isinstance(spec, str) or (
        isinstance(spec, (tuple, list)) and len(spec) > 0 and _is_int(spec[0])
    )


def resolve_heads(model, heads, *, kv_group: bool = False, groups=None) -> list[Head]:
    """Heads as a sorted list of ``(layer, head)``; ``heads`` may be one spec or a list of specs."""
    specs = [] if heads is None else [heads] if _is_single(heads) else list(heads)
    out: set[Head] = set()
    for spec in specs:
        out.update(_parse_one(model, spec))
    if kv_group:
        size = _kv_size(model)
        out = {head for layer, h in out for head in _group_heads(model, layer, h // size)}
    for group in groups or []:
        if isinstance(group, str):
            text = group.strip().upper()
            try:
                layer_text, kv_text = text[1:].split("KV")
                group = (int(layer_text), int(kv_text))
            except ValueError:
                raise ValueError(
                    f"cannot read kv group {group!r}; write (layer, kv_head) or 'L1KV0'"
                ) from None
        out.update(_group_heads(model, *group))
    return sorted(out)


def unit_label(unit: Sequence[Head], n_heads: int) -> str:
    """``"L1H3"`` for one head, ``"L1"`` for a whole layer, ``"L1H0+L1H2"`` otherwise."""
    layers = {layer for layer, _ in unit}
    if len(layers) == 1 and len(unit) == n_heads:
        return f"L{next(iter(layers))}"
    return "+".join(head_label(layer, head) for layer, head in unit)


def sweep_units(model, heads=None, *, kv_group: bool = False) -> list[list[Head]]:
    """What a sweep ablates, one list of heads per variant (see ``ablation_sweep``)."""
    cfg = model.cfg
    if heads is None or heads == "heads":
        units = [[(layer, h)] for layer in range(cfg.n_layers) for h in range(cfg.n_heads)]
    elif heads == "layers":
        units = [[(layer, h) for h in range(cfg.n_heads)] for layer in range(cfg.n_layers)]
    elif heads == "kv_groups":
        size = _kv_size(model)
        units = [
            _group_heads(model, layer, g)
            for layer in range(cfg.n_layers)
            for g in range(cfg.n_heads // size)
        ]
    else:
        specs = [heads] if _is_single(heads) else list(heads)
        if not specs:
            raise ValueError(
                f"heads is empty; give heads, or one of {', '.join(get_args(SweepUnits))}"
            )
        units = [
            resolve_heads(model, [spec] if _is_single(spec) else spec, kv_group=kv_group)
            for spec in specs
        ]
        empty = [i for i, unit in enumerate(units) if not unit]
        if empty:
            raise ValueError(f"heads item(s) {empty} name no head; every unit needs at least one")
        return units
    if kv_group:
        units = [resolve_heads(model, unit, kv_group=True) for unit in units]
    return units


# ---------------------------------------------------------------------------------------- reference


@dataclass
class Reference:
    """What ``mean`` and ``resample`` replace a head's output with, from reference prompts.

    ``mean[layer]`` is ``hook_z`` averaged over the prompts that have a real token at each position;
    ``z[layer]`` keeps every prompt's ``hook_z`` (only for ``resample``; empty otherwise).
    """

    mask: Bool[Tensor, "ref pos"]
    mean: dict[int, Float[Tensor, "pos head_index d_head"]]
    z: dict[int, Float[Tensor, "ref pos head_index d_head"]] = field(default_factory=dict)

    @classmethod
    @torch.no_grad()
    def build(
        cls, model, reference, layers: Sequence[int], *, keep_z: bool, batch_size: int = 16
    ) -> "Reference":
        probes = as_probes(model, reference)
        check_context(model, probes)
        tokens, mask = pad(probes, pad_id=_pad_id(model))
        device = model.cfg.device
        names = {utils.get_act_name("z", layer): layer for layer in layers}
        sums: dict[int, Tensor] = {}
        parts: dict[int, list[Tensor]] = {layer: [] for layer in layers}
        for start in range(0, len(probes), batch_size):
            chunk_mask = mask[start : start + batch_size].to(device)
            _, cache = model.run_with_cache(
                tokens[start : start + batch_size].to(device),
                attention_mask=chunk_mask.long(),
                names_filter=lambda name: name in names,
                return_type=None,
            )
            for name, layer in names.items():
                z = cache[name].detach().float()  # [batch, pos, head_index, d_head], layer's device
                weight = chunk_mask.to(z.device).float()[:, :, None, None]  # padding counts 0
                sums[layer] = sums.get(layer, 0) + (z * weight).sum(0)
                if keep_z:
                    parts[layer].append(z)
        count = (
            mask.to(device).float().sum(0)[:, None, None]
        )  # [pos, 1, 1]; >= 1: the longest prompt is real everywhere
        mean = {layer: total / count.to(total.device) for layer, total in sums.items()}
        z = {layer: torch.cat(chunks) for layer, chunks in parts.items()} if keep_z else {}
        return cls(mask.to(device), mean, z)

    def _check_length(self, n_pos: int) -> None:
        if n_pos > self.mask.shape[1]:
            raise ValueError(
                f"the input has {n_pos} positions but the reference prompts only "
                f"{self.mask.shape[1]}; "
                "give reference prompts at least as long as the input"
            )

    def mean_z(self, layer: int, n_pos: int) -> Float[Tensor, "pos head_index d_head"]:
        self._check_length(n_pos)
        return self.mean[layer][:n_pos]

    def sample_z(
        self, layer: int, n_pos: int, rows: int, seed: int
    ) -> Float[Tensor, "rows pos head_index d_head"]:
        self._check_length(n_pos)
        # reference prompts with at least n_pos real tokens
        eligible = self.mask[:, n_pos - 1].nonzero()[:, 0]
        if len(eligible) == 0:
            raise ValueError(
                f"no reference prompt has {n_pos} real tokens; give longer reference prompts"
            )
        g = torch.Generator().manual_seed(seed)
        pick = eligible[torch.randint(len(eligible), (rows,), generator=g).to(eligible.device)]
        z = self.z[layer]
        return z[pick.to(z.device), :n_pos]


# -------------------------------------------------------------------------------------------- hooks


def _replacement(
    method: str, layer: int, act: Tensor, base_batch: int, reference, seed: int
) -> Tensor:
    """Every head of ``act`` under ``method`` (the caller keeps the heads it doesn't ablate)."""
    if method == "zero":
        return torch.zeros_like(act)
    if method == "mean":  # act: [rows, pos, head_index, d_head]
        return reference.mean_z(layer, act.shape[1]).to(act.device, act.dtype).expand_as(act)
    if method == "resample":
        z = reference.sample_z(layer, act.shape[1], base_batch, seed).to(act.device, act.dtype)
        return z.repeat(act.shape[0] // base_batch, 1, 1, 1)
    if method == "bos":  # act: [rows, head_index, query_pos, key_pos]
        one_hot = torch.zeros_like(act)
        one_hot[..., 0] = 1.0
        return one_hot
    # uniform: act are scores [rows, head_index, query_pos, key_pos]; masked keys hold -inf
    visible = act > torch.finfo(act.dtype).min / 2
    return torch.where(visible, torch.zeros_like(act), act)


def _hook(
    method: str, layer: int, row_mask: Bool[Tensor, "rows head_index"], base_batch, reference, seed
):
    """A hook replacing the heads where ``row_mask`` is True (a one-row mask covers every row)."""
    site = _SITE[method]

    def hook(act: Tensor, hook) -> Tensor:
        rows = base_batch if base_batch is not None else act.shape[0]
        repl = _replacement(method, layer, act, rows, reference, seed)
        m = row_mask.to(act.device)
        m = m[:, None, :, None] if site == "z" else m[:, :, None, None]
        return torch.where(m, repl, act)  # a new tensor: the activation is never written in place

    return hook


def _hook_name(method: str, layer: int) -> str:
    return utils.get_act_name(_SITE[method], layer)


class Ablation:
    """Forward hooks that ablate some heads; a context manager and an iterable of ``(name, fn)``.

    ``with ablation: ...`` attaches the hooks (through ``model.hooks``) and removes them on exit,
    also when the body raises. ``model.run_with_hooks(tokens, fwd_hooks=list(ablation))`` uses them
    for one run.
    """

    def __init__(
        self, model, heads: list[Head], method: str, fwd_hooks: list[tuple[str, Callable]]
    ):
        self.model = model
        self.heads = heads
        self.method = method
        self.fwd_hooks = fwd_hooks
        self._context = None

    def __iter__(self) -> Iterator[tuple[str, Callable]]:
        return iter(self.fwd_hooks)

    def __len__(self) -> int:
        return len(self.fwd_hooks)

    def __repr__(self) -> str:
        heads = ", ".join(head_label(*h) for h in self.heads)
        return f"Ablation(method={self.method!r}, heads=[{heads}])"

    def __enter__(self) -> "Ablation":
        if self._context is not None:
            raise RuntimeError("this ablation is already active; leave its `with` block first")
        context = self.model.hooks(fwd_hooks=self.fwd_hooks)
        context.__enter__()
        self._context = context
        return self

    def __exit__(self, *exc_info) -> None:
        context, self._context = self._context, None
        context.__exit__(*exc_info)  # model.hooks removes its hooks in a finally


def ablate(
    model,
    heads,
    *,
    method: AblationMethod = "zero",
    reference: "list[str] | list[Probe] | Tensor | None" = None,
    kv_group: bool = False,
    groups: "Sequence[tuple[int, int] | str] | None" = None,
    seed: int = 0,
    allow_empty: bool = False,
) -> Ablation:
    """Knock out ``heads`` with ``method``; use as ``with ablate(...):`` or ``fwd_hooks=list(...)``.

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge`` in compatibility mode.
        heads: a head or a list of heads, each ``(layer, head)``, ``"L1H3"``, ``(layer, head,
            score)`` as ``HeadScores.top`` returns, or ``"L1"`` for every head of layer 1. Empty
            (and no ``groups``): ``InputError``, unless ``allow_empty``.
        method: one of ``zero, mean, resample, bos, uniform`` (module docstring).
        reference: prompts, probes or a ``[batch, pos]`` token tensor whose ``hook_z`` the ``mean``
            and ``resample`` methods use; required for them, ignored otherwise. Run once, now.
        kv_group: expand every head to all query heads that share its key/value head.
        groups: whole key/value groups to ablate as well, ``(layer, kv_head)`` or ``"L1KV0"``.
        seed: seed of the ``resample`` draw.
        allow_empty: accept an empty selection as a no-op (no hooks), e.g. for a baseline.
    """
    check_method(method)
    chosen = resolve_heads(model, heads, kv_group=kv_group, groups=groups)
    if not chosen and not allow_empty:
        raise InputError(
            f"ablate() got no heads to ablate (heads={heads!r}); give heads as (layer, head), "
            "'L1H3' or 'L1', or pass allow_empty=True for a deliberate no-op"
        )
    layers = sorted({layer for layer, _ in chosen})
    ref = _reference(model, method, reference, layers)
    hooks = []
    for layer in layers:
        row_mask = torch.zeros(1, model.cfg.n_heads, dtype=torch.bool)
        row_mask[0, [h for ly, h in chosen if ly == layer]] = True
        hooks.append((_hook_name(method, layer), _hook(method, layer, row_mask, None, ref, seed)))
    return Ablation(model, chosen, method, hooks)


def _reference(model, method: str, reference, layers: Sequence[int]) -> "Reference | None":
    if method not in ("mean", "resample"):
        return None
    if reference is None:
        raise ValueError(
            f"method={method!r} needs reference data: pass reference=<prompts, probes or tokens> "
            "(for example the same prompts you measure on)"
        )
    if not layers:
        return None
    return Reference.build(model, reference, layers, keep_z=method == "resample")


# ------------------------------------------------------------------------------------------- result


@dataclass
class AblationResult:
    """The metric under each ablation ("unit": one head, a layer, a group), per prompt.

    ``delta = ablated - baseline`` (positive for a loss means the ablation hurts); ``stderr`` is the
    standard error over prompts of the per-prompt delta (paired), NaN with one prompt.

    ``to_dataframe()`` has one row per unit: ``unit`` (``"L1H3"``, ``"L1"`` for a whole layer,
    ``"L1H0+L1H1"`` for a group), ``layer`` (-1 if the unit spans layers), ``head`` (-1 unless the
    unit is one head), ``baseline, ablated, delta, stderr``. ``estimate`` is True for attribution
    patching (``lens_attn.attribution_patching``), whose deltas are linear estimates.
    """

    units: list[list[tuple[int, int]]]
    baseline_per_prompt: Float[Tensor, " prompt"]
    ablated_per_prompt: Float[Tensor, "unit prompt"]
    n_layers: int
    n_heads: int
    method: str
    metric: str
    estimate: bool = False
    provenance: dict = field(default_factory=dict)

    @property
    def baseline(self) -> float:
        return float(self.baseline_per_prompt.mean())

    @property
    def ablated(self) -> Float[Tensor, " unit"]:
        return self.ablated_per_prompt.mean(dim=1)

    @property
    def delta(self) -> Float[Tensor, " unit"]:
        return (self.ablated_per_prompt - self.baseline_per_prompt[None]).mean(dim=1)

    @property
    def stderr(self) -> Float[Tensor, " unit"]:
        n = self.baseline_per_prompt.shape[0]
        if n < 2:
            return torch.full((len(self.units),), float("nan"))
        diff = self.ablated_per_prompt - self.baseline_per_prompt[None]
        return diff.std(dim=1) / math.sqrt(n)

    @property
    def labels(self) -> list[str]:
        return [unit_label(unit, self.n_heads) for unit in self.units]

    def to_dataframe(self):
        import pandas as pd

        rows = []
        for unit, label, ablated, delta, err in zip(
            self.units,
            self.labels,
            self.ablated.tolist(),
            self.delta.tolist(),
            self.stderr.tolist(),
            strict=True,
        ):
            layers = {layer for layer, _ in unit}
            rows.append({
                "unit": label,
                "layer": unit[0][0] if len(layers) == 1 else -1,
                "head": unit[0][1] if len(unit) == 1 else -1,
                "baseline": self.baseline, "ablated": ablated, "delta": delta, "stderr": err,
            })  # fmt: skip
        return pd.DataFrame(
            rows, columns=["unit", "layer", "head", "baseline", "ablated", "delta", "stderr"]
        )

    def grid(self) -> Float[Tensor, "layer head_index"]:
        """Deltas of single-head units as ``[layer, head_index]``; NaN where a head wasn't ablated.

        Layer and group units are left out (a layer sweep gives an all-NaN grid: use ``delta``).
        """
        grid = torch.full((self.n_layers, self.n_heads), float("nan"))
        for unit, delta in zip(self.units, self.delta.tolist(), strict=True):
            if len(unit) == 1:
                grid[unit[0]] = delta
        return grid

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` units with the largest delta, as ``(label, delta)``."""
        order = torch.argsort(self.delta, descending=True)[:k]
        return [(self.labels[i], float(self.delta[i])) for i in order]

    def save(self, directory: "str | os.PathLike") -> Path:
        """Write ``ablation.csv`` (the dataframe) and ``ablation.json`` (everything, per prompt)."""
        payload = {
            "units": self.units, "n_layers": self.n_layers, "n_heads": self.n_heads,
            "method": self.method, "metric": self.metric, "estimate": self.estimate,
            "provenance": self.provenance,
            "baseline_per_prompt": self.baseline_per_prompt.tolist(),
            "ablated_per_prompt": self.ablated_per_prompt.tolist(),
        }  # fmt: skip
        return save_table_and_json(directory, "ablation", self.to_dataframe(), payload)

    @classmethod
    def load(cls, directory: "str | os.PathLike") -> "AblationResult":
        p = load_json(directory, "ablation", "AblationResult")
        n_prompts = len(p["baseline_per_prompt"])
        return cls(
            units=[[(int(layer), int(head)) for layer, head in unit] for unit in p["units"]],
            baseline_per_prompt=torch.tensor(nan_for_null(p["baseline_per_prompt"])),
            ablated_per_prompt=torch.tensor(nan_for_null(p["ablated_per_prompt"])).reshape(
                -1, n_prompts
            ),
            n_layers=p["n_layers"], n_heads=p["n_heads"], method=p["method"], metric=p["metric"],
            estimate=p["estimate"], provenance=p.get("provenance", {}),
        )  # fmt: skip


# ----------------------------------------------------------------------------------- sweep inputs


@dataclass
class _Batch:
    """Prompts of one chunk, ready for the model and the metric."""

    tokens: Tensor
    mask: Tensor
    periods: list[int] | None
    answers: Tensor | None

    def repeat(self, n: int) -> "_Batch":
        return _Batch(
            self.tokens.repeat(n, 1), self.mask.repeat(n, 1),
            None if self.periods is None else self.periods * n,
            None if self.answers is None else self.answers.repeat(n, 1),
        )  # fmt: skip

    def select(self, idx: Tensor) -> "_Batch":
        """Prompts ``idx``, padded only to their own longest."""
        n = int(self.mask[idx].sum(1).max())
        return _Batch(
            self.tokens[idx, :n], self.mask[idx, :n],
            None if self.periods is None else [self.periods[i] for i in idx.tolist()],
            None if self.answers is None else self.answers[idx],
        )  # fmt: skip

    def first_needed(self, metric) -> int:
        """First position whose logits ``metric`` reads (the earlier ones it never looks at)."""
        if metric == "induction_loss":
            return min(self.periods) + 1  # predictions t >= period + 1
        if metric == "logit_diff":
            return int(self.mask.sum(1).min()) - 1  # the earliest last-real position
        return 0

    def cut(self, lo: int) -> "_Batch":
        """The same prompts seen from position ``lo`` on (periods shifted to match)."""
        return _Batch(
            self.tokens[:, lo:], self.mask[:, lo:],
            None if self.periods is None else [p - lo for p in self.periods], self.answers,
        )  # fmt: skip

    def measure(self, metric, logits: Tensor) -> Tensor:
        return per_prompt(
            metric, logits, self.tokens.to(logits.device), self.mask.to(logits.device),
            periods=self.periods, answer_tokens=self.answers,
        ).detach().float().cpu()  # fmt: skip


def prepare(model, tokens_or_probes, metric, answer_tokens) -> tuple[list[Probe], _Batch]:
    """Probes, padded tokens, mask, induction periods and answer ids for a metric."""
    probes = as_probes(model, tokens_or_probes)
    check_context(model, probes)
    tokens, mask = pad(probes, pad_id=_pad_id(model))
    periods = None
    if metric == "induction_loss":
        periods = [p.period if p.period is not None else repeat_period(p.tokens) for p in probes]
    answers = _answers(model, answer_tokens, len(probes)) if metric == "logit_diff" else None
    return probes, _Batch(tokens, mask, periods, answers)


def provenance(model, probes: list[Probe], **extra) -> dict:
    import lens_attn

    return {
        "model": getattr(model.cfg, "model_name", None), "probe_hash": probe_hash(probes),
        "n_prompts": len(probes), "lens_attn_version": lens_attn.__version__, **extra,
    }  # fmt: skip
