"""Head names and head specs: the one place that writes and reads ``"L3H5"``.

A *head spec* names query heads, wherever lens-attn takes heads (``ablate``, ``ablation_sweep``,
``confirm``, the notebook views, the CLI):

==================  ==========================================================================
spec                heads
==================  ==========================================================================
``"L1H3"``          query head 3 of layer 1 (TransformerLens's naming; case-insensitive)
``(1, 3)``          the same
``(1, 3, 0.87)``    the same, as ``HeadScores.top`` returns it (the score is ignored)
``"L1"``            every query head of layer 1
``"L1KV0"``         every query head reading key/value head 0 of layer 1 (GQA; ``groups=``)
==================  ==========================================================================

Under grouped-query attention query head ``h`` reads key/value head ``h // kv_size(model)``.
"""

import numbers
import re
from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor

from lens_attn.errors import InputError

Head = tuple[int, int]
"""``(layer, head_index)`` of one query head."""

SweepUnits = Literal["heads", "layers", "kv_groups"]
"""Whole-model unit sets a sweep can ablate one by one (``ablation_sweep(heads=...)``)."""

_NAME = re.compile(r"L(?P<layer>\d+)(?:H(?P<head>\d+)|KV(?P<kv_head>\d+))?")


def head_label(layer: int, head: int) -> str:
    """TransformerLens's head naming: ``head_label(3, 5) == "L3H5"``."""
    return f"L{layer}H{head}"


def unit_label(unit: Sequence[Head], n_heads: int) -> str:
    """``"L1H3"`` for one head, ``"L1"`` for a whole layer, ``"L1H0+L1H2"`` otherwise."""
    layers = {layer for layer, _ in unit}
    if len(layers) == 1 and len(unit) == n_heads:
        return f"L{next(iter(layers))}"
    return "+".join(head_label(layer, head) for layer, head in unit)


def _read_name(text: str) -> dict[str, int | None]:
    """``"L1H3"`` -> layer 1, head 3; ``"L1"`` -> layer 1; ``"L1KV0"`` -> layer 1, kv_head 0."""
    match = _NAME.fullmatch(text.strip().upper())
    if match is None:
        raise InputError(
            f"cannot read head {text!r}; write heads as 'L<layer>H<head>' (e.g. 'L1H3'), "
            "'L<layer>' for a whole layer, or 'L<layer>KV<kv_head>' for a key/value group"
        )
    return {k: None if v is None else int(v) for k, v in match.groupdict().items()}


def read_head(name: str) -> Head:
    """``"L3H5"`` -> ``(3, 5)`` without a model to check the range against (names from results)."""
    parsed = _read_name(name)
    if parsed["head"] is None:
        raise ValueError(f"{name!r} is not one head; write heads as 'L<layer>H<head>'")
    return parsed["layer"], parsed["head"]


def _check_range(spec, layer: int, head: int | None, n_layers: int, n_heads: int) -> None:
    if not 0 <= layer < n_layers:
        raise ValueError(
            f"head {spec!r}: layer {layer} out of range; valid layers 0..{n_layers - 1}"
        )
    if head is not None and not 0 <= head < n_heads:
        raise ValueError(f"head {spec!r}: head {head} out of range; valid heads 0..{n_heads - 1}")


def parse_head(spec: "str | tuple[int, int]", n_layers: int, n_heads: int) -> Head:
    """``"L1H3"`` or ``(1, 3)`` -> ``(1, 3)``, checked against the model's size."""
    if isinstance(spec, str):
        name = _read_name(spec)
        if name["head"] is None:
            raise ValueError(f"{spec!r} is not one head; write heads as 'L<layer>H<head>'")
        layer, head = name["layer"], name["head"]
    else:
        layer, head = (int(x) for x in spec)
    _check_range(spec, layer, head, n_layers, n_heads)
    return layer, head


def kv_size(model) -> int:
    """Query heads per key/value head (1 without GQA)."""
    n_kv = getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads
    return model.cfg.n_heads // n_kv


def kv_group_heads(model, layer: int, kv_head: int) -> list[Head]:
    """The query heads of ``layer`` that read key/value head ``kv_head``."""
    size = kv_size(model)
    n_kv = model.cfg.n_heads // size
    if not 0 <= layer < model.cfg.n_layers or not 0 <= kv_head < n_kv:
        raise ValueError(
            f"kv group ({layer}, {kv_head}) out of range; "
            f"valid layers 0..{model.cfg.n_layers - 1}, kv_head 0..{n_kv - 1}"
        )
    return [(layer, h) for h in range(kv_head * size, (kv_head + 1) * size)]


def _is_int(x) -> bool:
    if isinstance(x, bool) or (isinstance(x, Tensor) and x.dtype == torch.bool):
        return False  # (True, 1) is not a head
    return isinstance(x, numbers.Integral) or (
        isinstance(x, Tensor) and x.ndim == 0 and not x.is_floating_point()
    )


def _is_single(spec) -> bool:
    """One spec (a name or a tuple of ints), as opposed to a list of specs."""
    return isinstance(spec, str) or (
        isinstance(spec, (tuple, list)) and len(spec) > 0 and _is_int(spec[0])
    )


def parse_spec(model, spec) -> list[Head]:
    """One head spec (module docstring) -> its query heads, checked against the model's size."""
    cfg = model.cfg
    if isinstance(spec, str):
        name = _read_name(spec)
        if name["kv_head"] is not None:
            return kv_group_heads(model, name["layer"], name["kv_head"])
        _check_range(spec, name["layer"], name["head"], cfg.n_layers, cfg.n_heads)
        if name["head"] is None:
            return [(name["layer"], h) for h in range(cfg.n_heads)]
        return [(name["layer"], name["head"])]
    if isinstance(spec, (tuple, list)) and len(spec) == 3 and isinstance(spec[2], float):
        spec = tuple(spec[:2])  # (layer, head, value) as HeadScores.top returns
    if not (isinstance(spec, (tuple, list)) and len(spec) == 2 and all(map(_is_int, spec))):
        raise InputError(
            f"cannot read head {spec!r}; write heads as (layer, head) or 'L<layer>H<head>' "
            f"(a sweep also takes {', '.join(get_args(SweepUnits))})"
        )
    return [parse_head((int(spec[0]), int(spec[1])), cfg.n_layers, cfg.n_heads)]


def resolve_heads(model, heads, *, kv_group: bool = False, groups=None) -> list[Head]:
    """Heads as a sorted list of ``(layer, head)``; ``heads`` may be one spec or a list of specs.

    ``kv_group=True`` expands every head to its key/value group; ``groups`` adds whole groups,
    each ``(layer, kv_head)`` or ``"L1KV0"``.
    """
    specs = [] if heads is None else [heads] if _is_single(heads) else list(heads)
    out: set[Head] = set()
    for spec in specs:
        out.update(parse_spec(model, spec))
    if kv_group:
        size = kv_size(model)
        out = {head for layer, h in out for head in kv_group_heads(model, layer, h // size)}
    for group in groups or []:
        if isinstance(group, str):
            name = _read_name(group)
            if name["kv_head"] is None:
                raise ValueError(
                    f"cannot read kv group {group!r}; write (layer, kv_head) or 'L1KV0'"
                )
            group = (name["layer"], name["kv_head"])
        out.update(kv_group_heads(model, *group))
    return sorted(out)


def sweep_units(model, heads=None, *, kv_group: bool = False) -> list[list[Head]]:
    """What a sweep ablates, one list of heads per variant (see ``ablation_sweep``)."""
    cfg = model.cfg
    if heads is None or heads == "heads":
        units = [[(layer, h)] for layer in range(cfg.n_layers) for h in range(cfg.n_heads)]
    elif heads == "layers":
        units = [[(layer, h) for h in range(cfg.n_heads)] for layer in range(cfg.n_layers)]
    elif heads == "kv_groups":
        size = kv_size(model)
        units = [
            kv_group_heads(model, layer, g)
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
