"""The registry of analyses by name: ``register_analysis`` and name resolution.

It imports no built-in score: ``lens_attn.scoring`` (the package) imports
``lens_attn.scoring.builtin``, which registers the built-ins here, before any of its modules is used.
"""

import difflib

from lens_attn.scoring.protocol import Analysis, RatioAnalysis

_REGISTRY: dict[str, Analysis] = {}


def register_analysis(
    name_or_analysis: "str | Analysis",
    *,
    hooks: tuple[str, ...] = ("pattern",),
    chunkable: bool = False,
):
    """Register an analysis by name; a duplicate name is refused with ``ValueError``.

    Use as a decorator on a function returning ``PromptRatio`` (``@register_analysis("punct")``), or call
    with an ``Analysis`` instance (``register_analysis(MyAnalysis())``). ``chunkable=True`` declares that
    the function handles a block of query rows (see ``Batch.query_rows``) for chunked scoring.
    """
    if isinstance(name_or_analysis, Analysis):
        _add(name_or_analysis)
        return name_or_analysis

    def decorator(fn):
        _add(RatioAnalysis(name_or_analysis, fn, hooks, chunkable=chunkable))
        return fn

    return decorator


def _add(analysis: Analysis) -> None:
    taken = {n for a in _REGISTRY.values() for n in a.score_names()} | set(_REGISTRY)
    clash = [n for n in (analysis.name, *analysis.score_names()) if n in taken]
    if not analysis.name:
        raise ValueError("an analysis needs a non-empty name")
    if clash:
        raise ValueError(f"an analysis named {clash[0]!r} is already registered; pick another name")
    _REGISTRY[analysis.name] = analysis


def unregister_analysis(name: str) -> None:
    """Remove a registered analysis (for notebooks that re-run their registering cell)."""
    if name not in _REGISTRY:
        raise ValueError(f"no analysis named {name!r}; registered: {', '.join(_REGISTRY)}")
    del _REGISTRY[name]


def registered() -> dict[str, Analysis]:
    """A copy of the registry: analysis name -> analysis."""
    return dict(_REGISTRY)


def resolve(names: "list[str | Analysis] | None", *, default: list[str]) -> list[Analysis]:
    """Turn score/analysis names (or instances) into analyses; unknown names list the valid ones."""
    registry = registered()
    by_output = {out: a for a in registry.values() for out in a.score_names()}
    chosen: list[Analysis] = []
    for item in default if names is None else names:
        if isinstance(item, Analysis):
            analysis = item
        elif item in registry:
            analysis = registry[item]
        elif item in by_output:
            analysis = by_output[item]
        else:
            valid = sorted(set(registry) | set(by_output))
            close = difflib.get_close_matches(str(item), valid, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"unknown score {item!r}{hint}; valid: {', '.join(valid)}")
        if analysis not in chosen:
            chosen.append(analysis)
    if not chosen:
        raise ValueError("no scores requested; pass scores=None for every built-in score")
    return chosen
