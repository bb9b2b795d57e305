"""Layer x head grids as heatmaps: a score of every head (``plot_scores``), ablation effects
(``plot_ablation``), any ``[layer, head_index]`` tensor (``plot_head_grid``).

    >>> scores = lens_attn.score_heads(model, progress=False)
    >>> fig = plot_scores(scores, "induction")
    >>> fig.axes[0].get_title()
    'induction score'
"""

from jaxtyping import Float
from torch import Tensor

from lens_attn.render.figures import CMAP, figure_and_axes


def plot_head_grid(
    grid: Float[Tensor, "layer head_index"],
    *,
    title: str = "",
    label: str = "",
    annotate: bool | None = None,
    cmap: str = CMAP,
    center: float | None = None,
    ax=None,
):
    """A ``[layer, head_index]`` grid as a heatmap; NaN cells (e.g. heads not ablated) are grey.

    Args:
        annotate: write each value into its cell; ``None`` does so for grids of <= 256 cells.
        center: make the colour scale symmetric around this value (use a diverging ``cmap``).
    """
    if grid.ndim != 2:
        raise ValueError(f"grid must be [layer, head_index], got shape {tuple(grid.shape)}")
    import matplotlib
    import numpy as np

    values = grid.detach().float().cpu().numpy()
    n_layers, n_heads = values.shape
    fig, ax = figure_and_axes(ax, max(4.0, 0.55 * n_heads + 2.2), max(2.5, 0.45 * n_layers + 1.4))
    finite = values[~np.isnan(values)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if center is not None:
        half = max(abs(vmax - center), abs(vmin - center)) or 1.0
        vmin, vmax = center - half, center + half
    colormap = matplotlib.colormaps[cmap].with_extremes(bad="#d0d0d0")
    image = ax.imshow(
        values, cmap=colormap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest"
    )
    ax.set_xticks(range(n_heads), [str(h) for h in range(n_heads)])
    ax.set_yticks(range(n_layers), [str(layer) for layer in range(n_layers)])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, label=label)
    if annotate is None:
        annotate = values.size <= 256
    if annotate:
        for layer in range(n_layers):
            for head in range(n_heads):
                v = values[layer, head]
                if np.isnan(v):
                    continue
                r, g, b, _ = colormap(image.norm(v))
                colour = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"  # luma
                ax.text(head, layer, f"{v:.2f}", ha="center", va="center", fontsize=7, color=colour)
    return fig


def plot_scores(scores, name: str, *, annotate: bool | None = None, ax=None):
    """One score of a ``HeadScores`` (``scores.values[name]``) as a layer x head heatmap."""
    return plot_head_grid(scores[name], title=f"{name} score", label=name, annotate=annotate, ax=ax)


def plot_ablation(result, *, annotate: bool | None = None, ax=None):
    """The per-head effect of an ablation as a layer x head heatmap (grey: head not ablated).

    ``result`` is an ``AblationResult`` or anything with ``.grid()`` returning ``[layer,
    head_index]`` (NaN where not ablated) and optionally ``.metric`` / ``.method`` strings for the
    labels.
    """
    if not callable(getattr(result, "grid", None)):
        raise ValueError(
            f"expected an AblationResult (an object with .grid()), got {type(result).__name__}"
        )
    metric = getattr(result, "metric", "metric")
    method = getattr(result, "method", "")
    title = f"{method} ablation: change in {metric}" if method else f"change in {metric}"
    return plot_head_grid(
        result.grid(),
        title=title,
        label=f"delta {metric}",
        annotate=annotate,
        cmap="RdBu_r",
        center=0.0,
        ax=ax,
    )
