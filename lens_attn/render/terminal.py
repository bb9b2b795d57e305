"""Plain-text views for a terminal: a block-character heatmap of one head, a per-head score table.

    >>> patterns = lens_attn.capture_patterns(model, ["The cat sat on the mat. The cat"])
    >>> print(text_heatmap(patterns.head(1, 3), patterns.str_tokens[0], title="L1H3"))
    L1H3  (rows: query (destination), columns: key (source); ' ░▒▓█' = weight / ...)
    0 <s>          |█...|
    1 ·The         |...|
    ...

Spaces in tokens show as ``·``, newlines as ``\\n``. Long sequences are max-pooled into blocks of
positions so the map fits ``max_size`` columns; a row label then names the first position and token
of its block.
"""

import math

import torch
from jaxtyping import Float
from torch import Tensor

from lens_attn.patterns import AttentionPatterns
from lens_attn.render.figures import check_pattern

SHADES = " ░▒▓█"  # weight / vmax rounded to quarters: 0, 1/4, 1/2, 3/4, 1
TOKEN_WIDTH = 12


def _shade(value: float) -> str:
    return SHADES[min(len(SHADES) - 1, max(0, round(value * (len(SHADES) - 1))))]


def _short(token: str, width: int = TOKEN_WIDTH) -> str:
    from lens_attn.text import escape_bidi

    text = (
        escape_bidi(token)
        .replace("\n", "\\n")
        .replace("\t", "\\t")
        .replace("\r", "\\r")
        .replace(" ", "·")
    )
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= width else text[: width - 1] + "…"


def _max_pool(pattern: Tensor, block: int) -> Tensor:
    """``[n, n] -> [ceil(n/block), ceil(n/block)]``: the maximum over each block x block square."""
    n = pattern.shape[0]
    padded = torch.zeros(math.ceil(n / block) * block, math.ceil(n / block) * block)
    padded[:n, :n] = pattern
    m = padded.shape[0] // block
    return padded.reshape(m, block, m, block).amax(dim=(1, 3))  # [m, m]


def text_heatmap(
    pattern: Float[Tensor, "query_pos key_pos"],
    tokens: list[str],
    *,
    title: str = "",
    vmax: float | None = None,
    max_size: int = 64,
) -> str:
    """One head's pattern as rows of ``' ░▒▓█'`` characters, one row per query and one column per
    key.

    Args:
        vmax: the weight drawn as a full block; ``None`` uses the head's largest weight outside
            row 0 (the first query can only attend to itself).
        max_size: at most this many rows and columns; longer sequences are max-pooled into blocks.
    """
    n = check_pattern(pattern, tokens)
    if max_size < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    values = pattern.detach().float().cpu()
    # row 0 always puts all its weight on itself, so it is left out of the default scale
    top = float(values[1:].max() if n > 1 else values.max()) if vmax is None else float(vmax)
    top = top if top > 0 else 1.0
    block = math.ceil(n / max_size)
    pooled = _max_pool(values, block) if block > 1 else values
    legend = f"' {SHADES[1:]}' = weight / {top:.2g}" + (
        f", max over {block}x{block} blocks" if block > 1 else ""
    )
    lines = [f"{title}  (rows: query (destination), columns: key (source); {legend})".lstrip()]
    width = len(str(n - 1))
    for row in range(pooled.shape[0]):
        pos = row * block
        cells = "".join(_shade(float(v) / top) for v in pooled[row])
        lines.append(f"{pos:>{width}} {_short(tokens[pos]):<{TOKEN_WIDTH}} |{cells}|")
    return "\n".join(lines)


def strongest_heads(
    patterns: AttentionPatterns, k: int = 3, *, batch: int = 0
) -> list[tuple[int, int, float]]:
    """The ``k`` heads with the sharpest non-trivial attention, as ``(layer, head, strength)``.

    Strength is the mean over queries ``q >= 2`` of the largest weight on a key that is neither BOS
    (position 0) nor the query itself: high for previous-token, induction and duplicate-token heads,
    low for heads that park their attention on BOS or on the current token.
    """
    ranked = []
    for layer in patterns.layers:
        maps = (
            patterns.layer(layer, batch).detach().float().cpu()
        )  # [head_index, query_pos, key_pos]
        n = maps.shape[-1]
        if n < 3:
            strength = torch.zeros(maps.shape[0])
        else:
            masked = maps.clone()
            masked[:, :, 0] = 0.0  # BOS
            masked[:, torch.arange(n), torch.arange(n)] = 0.0  # the query itself
            strength = masked[:, 2:, :].amax(dim=-1).mean(dim=-1)  # [head_index]
        ranked += [(layer, head, float(s)) for head, s in enumerate(strength)]
    ranked.sort(key=lambda item: -item[2])
    return ranked[: max(0, k)]


def score_table(
    scores,
    *,
    names: list[str] | None = None,
    sort_by: str | None = None,
    top: int | None = None,
    stderr: bool = False,
    digits: int = 3,
) -> str:
    """A printable table with one row per head (``unit`` ``"L1H3"``, layer, head, the chosen scores).

    Args:
        scores: a ``HeadScores``.
        names: scores to show, in order; ``None`` shows all of them.
        sort_by: a score to sort by, highest first; ``None`` keeps layer-major order.
        top: keep only the first ``top`` rows (after sorting).
        stderr: also show ``<score>_stderr`` columns.
    """
    df = scores.to_dataframe()
    available = list(scores.values)
    names = available if names is None else list(names)
    unknown = [name for name in names + ([sort_by] if sort_by else []) if name not in available]
    if unknown:
        raise ValueError(f"unknown score(s) {unknown}; this result has: {', '.join(available)}")
    columns = ["unit", "layer", "head"]
    for name in names:
        columns.append(name)
        if stderr and f"{name}_stderr" in df.columns:
            columns.append(f"{name}_stderr")
    df = df[columns]
    if sort_by:
        df = df.sort_values(sort_by, ascending=False, na_position="last", kind="stable")
    if top is not None:
        df = df.head(top)
    return df.to_string(index=False, float_format=lambda v: f"{v:.{digits}f}", na_rep="-")
