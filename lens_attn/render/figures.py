"""Matplotlib figures of attention patterns, head scores and ablation effects.

    >>> patterns = lens_attn.capture_patterns(model, "The cat sat on the mat. The cat")
    >>> fig = plot_head(patterns, layer=1, head=3)        # the classic Llama 2 attention map
    >>> save_figure(fig, tmp_path / "L1H3.png").suffix    # .png, .svg or .pdf
    '.png'

Every function returns a ``matplotlib.figure.Figure`` built with the object API (no pyplot state, so
nothing is shown implicitly and it works under the Agg backend without a display). Functions that
draw a single panel also take ``ax=`` to draw into an existing axes and return that axes' figure.

Long sequences stay readable: at most ``MAX_TICK_LABELS`` token labels per axis (evenly thinned),
and ``window=(start, stop)`` shows only positions ``start .. stop - 1`` on both axes.
"""

import math
import os
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from lens_attn.heads import head_label
from lens_attn.patterns import AttentionPatterns

MAX_TICK_LABELS = 40  # more token labels per axis than this are unreadable at usual figure sizes
PANEL_TICK_LABELS = 20  # the same for one ~3 inch panel of a grid
CMAP = "viridis"
SAVE_FORMATS = (".png", ".svg", ".pdf")
QUERY_LABEL = "query (destination)"
KEY_LABEL = "key (source)"


# ------------------------------------------------------------------------------------------ helpers


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def figure_and_axes(ax, width: float, height: float):
    if ax is not None:
        return ax.figure, ax
    fig = _new_figure(width, height)
    return fig, fig.add_subplot()


def token_label(token: str) -> str:
    """A token as a tick label: whitespace and bidi controls made visible, ``$`` escaped (no mathtext)."""
    from lens_attn.text import escape_bidi

    return (
        escape_bidi(token)
        .replace("\n", "\\n")
        .replace("\t", "\\t")
        .replace("\r", "\\r")
        .replace("$", r"\$")
    )


def tick_positions(n: int, max_labels: int = MAX_TICK_LABELS) -> list[int]:
    """Evenly thinned tick positions ``0, step, 2*step, ...``, at most ``max_labels`` of them."""
    step = max(1, math.ceil(n / max_labels))
    return list(range(0, n, step))


def check_pattern(pattern: Tensor, tokens: list[str]) -> int:
    """The number of positions of a square ``[query_pos, key_pos]`` pattern with one token each."""
    if pattern.ndim != 2 or pattern.shape[0] != pattern.shape[1]:
        raise ValueError(
            f"pattern must be a square [query_pos, key_pos] matrix, got {tuple(pattern.shape)}"
        )
    n = pattern.shape[0]
    if len(tokens) != n:
        raise ValueError(
            f"got {len(tokens)} tokens for a pattern over {n} positions; they must match"
        )
    return n


def check_window(window: tuple[int, int] | None, n: int) -> tuple[int, int]:
    """``window`` as ``(start, stop)`` within ``0..n``; ``None`` is the whole sequence."""
    if window is None:
        return 0, n
    try:
        start, stop = (int(x) for x in window)
    except (TypeError, ValueError):
        raise ValueError(f"window must be a pair (start, stop), got {window!r}") from None
    if not 0 <= start < stop <= n:
        raise ValueError(
            f"window {window!r} is not within this sequence; need 0 <= start < stop <= {n}"
        )
    return start, stop


def _set_token_ticks(
    ax, tokens: list[str], *, axis: str, max_labels: int = MAX_TICK_LABELS
) -> None:
    positions = tick_positions(len(tokens), max_labels)
    labels = [token_label(tokens[i]) for i in positions]
    if axis == "x":
        ax.set_xticks(positions, labels, rotation=90, fontsize=8)
    else:
        ax.set_yticks(positions, labels, fontsize=8)


def _axis_suffix(start: int, stop: int, n: int) -> str:
    return "" if (start, stop) == (0, n) else f", positions {start}-{stop - 1}"


def _matrix(pattern: Tensor):
    return pattern.detach().float().cpu().numpy()


# ------------------------------------------------------------------------------------- pattern maps


def plot_pattern(
    pattern: Float[Tensor, "query_pos key_pos"],
    tokens: list[str],
    *,
    title: str = "",
    window: tuple[int, int] | None = None,
    vmax: float | None = None,
    colorbar: bool = True,
    ax=None,
):
    """One attention map with token labels on both axes: rows are queries, columns keys.

    Args:
        pattern: ``[query_pos, key_pos]`` attention weights.
        tokens: one string per position (``len(tokens) == query_pos == key_pos``).
        window: ``(start, stop)`` to show only those positions on both axes.
        vmax: top of the colour scale; ``None`` uses the largest weight shown (bottom is always 0).
    """
    n = check_pattern(pattern, tokens)
    start, stop = check_window(window, n)
    shown = pattern[start:stop, start:stop]
    fig, ax = figure_and_axes(ax, 6.4, 5.6)
    image = ax.imshow(_matrix(shown), cmap=CMAP, vmin=0.0, vmax=vmax, interpolation="nearest")
    _set_token_ticks(ax, tokens[start:stop], axis="x")
    _set_token_ticks(ax, tokens[start:stop], axis="y")
    suffix = _axis_suffix(start, stop, n)
    ax.set_xlabel(KEY_LABEL + suffix)
    ax.set_ylabel(QUERY_LABEL + suffix)
    if title:
        ax.set_title(title)
    if colorbar:
        fig.colorbar(image, ax=ax, label="attention weight", shrink=0.8)
    return fig


def plot_head(
    patterns: AttentionPatterns,
    layer: int,
    head: int,
    *,
    batch: int = 0,
    window: tuple[int, int] | None = None,
    ax=None,
):
    """One head's map (``"L{layer}H{head}"``) for prompt ``batch``: the classic Llama 2 figure."""
    return plot_pattern(
        patterns.head(layer, head, batch),
        patterns.str_tokens[batch],
        title=head_label(layer, head),
        window=window,
        ax=ax,
    )


def _grid_shape(n_panels: int, ncols: int | None) -> tuple[int, int]:
    ncols = ncols or min(n_panels, 4)
    return math.ceil(n_panels / ncols), ncols


def _plot_panels(
    maps: Float[Tensor, "panel query_pos key_pos"],
    titles: list[str],
    tokens: list[str],
    *,
    suptitle: str,
    window: tuple[int, int] | None,
    ncols: int | None,
):
    """Several maps on one shared colour scale, token labels on the outer axes only."""
    n = maps.shape[-1]
    start, stop = check_window(window, n)
    shown = maps[:, start:stop, start:stop]
    vmax = float(shown.max()) if shown.numel() else 1.0
    nrows, ncols = _grid_shape(len(titles), ncols)
    fig = _new_figure(3.0 * ncols + 1.0, 3.0 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    suffix = _axis_suffix(start, stop, n)
    image = None
    for i, ax in enumerate(axes.flat):
        if i >= len(titles):
            ax.set_visible(False)
            continue
        image = ax.imshow(
            _matrix(shown[i]), cmap=CMAP, vmin=0.0, vmax=vmax, interpolation="nearest"
        )
        ax.set_title(titles[i], fontsize=10)
        # token labels on the outer panels only (inner ticks cost layout time and say nothing new)
        if i + ncols >= len(titles):  # lowest panel of its column
            _set_token_ticks(ax, tokens[start:stop], axis="x", max_labels=PANEL_TICK_LABELS)
            ax.set_xlabel(KEY_LABEL + suffix)
        else:
            ax.set_xticks([])
        if i % ncols == 0:
            _set_token_ticks(ax, tokens[start:stop], axis="y", max_labels=PANEL_TICK_LABELS)
            ax.set_ylabel(QUERY_LABEL + suffix)
        else:
            ax.set_yticks([])
    fig.colorbar(image, ax=axes, label="attention weight", shrink=0.6)
    fig.suptitle(suptitle)
    return fig


def plot_layer(
    patterns: AttentionPatterns,
    layer: int,
    *,
    batch: int = 0,
    window: tuple[int, int] | None = None,
    ncols: int | None = None,
):
    """Every head of one layer in a grid, on one colour scale shared by all heads."""
    maps = patterns.layer(layer, batch)
    titles = [head_label(layer, head) for head in range(maps.shape[0])]
    return _plot_panels(
        maps,
        titles,
        patterns.str_tokens[batch],
        suptitle=f"layer {layer}",
        window=window,
        ncols=ncols,
    )


def plot_head_across_layers(
    patterns: AttentionPatterns,
    head: int,
    *,
    batch: int = 0,
    window: tuple[int, int] | None = None,
    ncols: int | None = None,
):
    """Head ``head`` of every captured layer side by side, on one shared colour scale."""
    maps = torch.stack([patterns.head(layer, head, batch) for layer in patterns.layers])
    titles = [head_label(layer, head) for layer in patterns.layers]
    return _plot_panels(
        maps,
        titles,
        patterns.str_tokens[batch],
        suptitle=f"head {head} in every layer",
        window=window,
        ncols=ncols,
    )


def plot_mean_over_heads(
    patterns: AttentionPatterns,
    layer: int,
    *,
    batch: int = 0,
    window: tuple[int, int] | None = None,
    ax=None,
):
    """The head-averaged map of one layer."""
    return plot_pattern(
        patterns.mean_over_heads(layer, batch),
        patterns.str_tokens[batch],
        title=f"layer {layer}, mean over heads",
        window=window,
        ax=ax,
    )


# ------------------------------------------------------------------------------------------ rollout


def attention_rollout(
    patterns: AttentionPatterns, batch: int = 0
) -> Float[Tensor, "query_pos key_pos"]:
    """Attention rollout (Abnar & Zuidema 2020) through the captured layers, for prompt ``batch``.

    Each layer's head-averaged pattern ``A`` gets the identity added for the residual stream and its
    rows renormalised, ``Â = (A + I) / rowsum``; the layers are then multiplied, later layers on the
    left: ``R = Â_L ... Â_1``. Row ``q`` of ``R`` says how much of query ``q``'s final residual
    stream traces back to each input position. The captured layers must be consecutive (rollout
    skips nothing).
    """
    layers = patterns.layers
    if layers != list(range(layers[0], layers[0] + len(layers))):
        raise ValueError(f"rollout needs consecutive layers; these patterns hold layers {layers}")
    rollout = None
    for layer in layers:
        mean = patterns.mean_over_heads(layer, batch).double()  # [query_pos, key_pos]
        a = mean + torch.eye(mean.shape[0], dtype=mean.dtype)
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return rollout.float()


def plot_rollout(
    patterns: AttentionPatterns, *, batch: int = 0, window: tuple[int, int] | None = None, ax=None
):
    """The attention rollout map through all captured layers (see ``attention_rollout``)."""
    first, last = patterns.layers[0], patterns.layers[-1]
    return plot_pattern(
        attention_rollout(patterns, batch),
        patterns.str_tokens[batch],
        title=f"attention rollout, layers {first}-{last}",
        window=window,
        ax=ax,
    )


# ------------------------------------------------------------------------------------ one query row


def plot_query_attention(
    patterns: AttentionPatterns,
    layer: int,
    head: int,
    query_pos: int,
    *,
    batch: int = 0,
    window: tuple[int, int] | None = None,
    ax=None,
):
    """A bar chart of how query ``query_pos`` of head ``L{layer}H{head}`` spreads its attention over
    keys.

    ``query_pos`` may be negative (``-1`` is the last real token). Keys after the query get no
    attention under causal masking and are left out unless ``window`` asks for them.
    """
    pattern = patterns.head(layer, head, batch)
    tokens = patterns.str_tokens[batch]
    n = pattern.shape[0]
    if not -n <= query_pos < n:
        raise ValueError(
            f"query_pos {query_pos} out of range; this prompt has positions 0..{n - 1}"
        )
    query_pos = query_pos % n
    start, stop = check_window(window if window is not None else (0, query_pos + 1), n)
    weights = pattern[query_pos, start:stop].detach().float().cpu().numpy()
    fig, ax = figure_and_axes(ax, max(4.0, min(12.0, 0.25 * (stop - start) + 2.0)), 3.6)
    ax.bar(range(stop - start), weights, color="tab:blue")
    _set_token_ticks(ax, tokens[start:stop], axis="x")
    ax.set_xlabel(KEY_LABEL + _axis_suffix(start, stop, n))
    ax.set_ylabel("attention weight")
    ax.set_ylim(0, max(1e-6, float(weights.max())) * 1.05)
    ax.set_title(f"{head_label(layer, head)}, query {query_pos} {token_label(tokens[query_pos])!r}")
    return fig


# ---------------------------------------------------------------------------- layer x head heatmaps


# ------------------------------------------------------------------------------------------- saving


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 150) -> Path:
    """Write ``fig`` as PNG, SVG or PDF (chosen by the suffix) atomically (``lens_attn.runs``)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SAVE_FORMATS:
        raise ValueError(
            f"cannot save a figure as {path.name!r}; use one of: {', '.join(SAVE_FORMATS)}"
        )
    from lens_attn.files import open_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    with open_atomic(path) as fh:
        fig.savefig(fh, format=suffix[1:], dpi=dpi)
    return path
