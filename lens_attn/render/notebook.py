"""CircuitsVis views of attention patterns for notebooks, rendered from local code only.

    >>> patterns = lens_attn.capture_patterns(model, "The cat sat on the mat. The cat")
    >>> view = heads_of_layer(patterns, layer=1)               # displays inline in Jupyter
    >>> view = chosen_heads(patterns, ["L1H3", "L2H0"])
    >>> view = top_heads(patterns, lens_attn.score_heads(model, progress=False), "induction", k=4)
    >>> graph = circuit_graph(lens_attn.circuit(model, ["L1H3"], top_k=4, faithfulness=False))
    >>> "<script" in view._repr_html_()
    True

Each function returns CircuitsVis's own ``RenderedHTML`` (from ``circuitsvis.attention``), as a
``LocalRenderedHTML``: a subclass whose notebook display always uses the self-contained local form.

Why: CircuitsVis's ``RenderedHTML._repr_html_`` first calls ``internet_on()``, which opens
``http://google.com`` to decide between its CDN and the bundled JavaScript (see
``circuitsvis/utils/render.py``). Displaying a view therefore reaches the network (and waits up to a
second when offline). ``LocalRenderedHTML`` returns ``local_src`` from ``_repr_html_``, ``__html__``
and ``str()``, so nothing is fetched and the view works offline; ``show_code()`` still gives the CDN
form.

Escaping: CircuitsVis writes its props as JSON inside an inline ``<script>``, so a token containing
``</script>`` would end the script and run what follows. The props JSON in both sources is rewritten
with ``<``, ``>``, ``&``, U+2028 and U+2029 as ``\\uXXXX`` escapes (the same JSON value, nothing to
break out of). The ``AttentionPatterns`` view inserts tokens as HTML (React
``dangerouslySetInnerHTML``), so its tokens are HTML-escaped first; ``AttentionHeads`` draws tokens
on a canvas and gets them unchanged.
"""

import functools
import html
import math

from lens_attn.heads import head_label
from lens_attn.patterns import AttentionPatterns

_JSON_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


def script_safe_json(text: str) -> str:
    """JSON text that cannot end an inline ``<script>``: ``<``, ``>``, ``&``, U+2028/9 escaped.

    Those characters only occur inside JSON strings, where ``\\uXXXX`` is the same value.
    """
    for char, escape in _JSON_ESCAPES.items():
        text = text.replace(char, escape)
    return text


@functools.cache
def _local_class():
    from circuitsvis.utils.render import RenderedHTML

    class LocalRenderedHTML(RenderedHTML):
        """A CircuitsVis ``RenderedHTML`` that always shows its local, self-contained source."""

        def _repr_html_(self) -> str:
            return self.local_src

        def __html__(self) -> str:
            return self.local_src

        def __str__(self) -> str:
            return self.local_src

    LocalRenderedHTML.__module__ = __name__
    LocalRenderedHTML.__qualname__ = "LocalRenderedHTML"
    return LocalRenderedHTML


def _make_safe(rendered, props: dict):
    """``rendered`` (a CircuitsVis RenderedHTML) with script-safe props -> LocalRenderedHTML."""
    from circuitsvis.utils.convert_props import convert_props

    raw = convert_props(props)  # the exact JSON text CircuitsVis put into both sources
    safe = script_safe_json(raw)
    local_src, cdn_src = rendered.local_src, rendered.cdn_src
    if raw != safe:
        if local_src.count(raw) != 1 or cdn_src.count(raw) != 1:
            raise RuntimeError("CircuitsVis changed how it writes props; cannot escape them safely")
        local_src, cdn_src = local_src.replace(raw, safe), cdn_src.replace(raw, safe)
    return _local_class()(local_src, cdn_src)


def _heads_view(patterns: AttentionPatterns, heads: list[tuple[int, int]], batch: int):
    import circuitsvis.attention
    import torch

    attention = torch.stack([patterns.head(layer, head, batch) for layer, head in heads]).float()
    tokens = list(patterns.str_tokens[batch])
    names = [head_label(layer, head) for layer, head in heads]
    rendered = circuitsvis.attention.attention_heads(attention, tokens, attention_head_names=names)
    # the props as circuitsvis.attention.attention_heads passes them to render()
    return _make_safe(
        rendered, {"attention": attention, "attentionHeadNames": names, "tokens": tokens}
    )


def _check_heads(patterns: AttentionPatterns, heads) -> list[tuple[int, int]]:
    if not heads:
        raise ValueError(
            "no heads given; pass heads as 'L<layer>H<head>' strings or (layer, head) pairs"
        )
    return [patterns.parse_head(spec) for spec in heads]


def heads_of_layer(
    patterns: AttentionPatterns, layer: int, *, heads: list[int] | None = None, batch: int = 0
):
    """CircuitsVis ``attention_heads`` for one layer: all heads, or the ``heads`` given."""
    heads = list(range(patterns.n_heads)) if heads is None else list(heads)
    return _heads_view(patterns, _check_heads(patterns, [(layer, head) for head in heads]), batch)


def chosen_heads(patterns: AttentionPatterns, heads: list, *, batch: int = 0):
    """CircuitsVis ``attention_heads`` for heads from any layers: ``["L1H3", (2, 0), ...]``."""
    return _heads_view(patterns, _check_heads(patterns, heads), batch)


def top_heads(
    patterns: AttentionPatterns,
    scores,
    score: str,
    *,
    k: int = 8,
    largest: bool = True,
    batch: int = 0,
):
    """CircuitsVis ``attention_heads`` for the ``k`` top heads of ``scores.values[score]``.

    Only heads in captured layers with a finite score are ranked; ``largest=False`` ranks lowest
    first (e.g. for ``entropy``).
    """
    scores.check_score(score)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ranked = scores.top(score, k=scores.n_layers * scores.n_heads, largest=largest)
    chosen = [
        (layer, head)
        for layer, head, value in ranked
        if layer in patterns.layers and math.isfinite(value)
    ]
    if not chosen:
        raise ValueError(
            f"score {score!r} has no finite value in the captured layers {patterns.layers}"
        )
    return _heads_view(patterns, chosen[:k], batch)


def patterns_of_layer(patterns: AttentionPatterns, layer: int, *, batch: int = 0):
    """CircuitsVis ``attention_patterns`` (the older token-by-token view) of one layer's heads."""
    import circuitsvis.attention

    attention = patterns.layer(layer, batch).float()
    # this view inserts tokens as HTML, so they are escaped here (and shown as text)
    tokens = [html.escape(token) for token in patterns.str_tokens[batch]]
    rendered = circuitsvis.attention.attention_patterns(tokens=tokens, attention=attention)
    return _make_safe(rendered, {"tokens": tokens, "attention": attention})


class InlineHTML(str):
    """HTML that notebooks display inline (``_repr_html_``); ``str()`` is the markup."""

    def _repr_html_(self) -> str:
        return str(self)

    def __html__(self) -> str:
        return str(self)


def circuit_graph(circuit, *, href: str = "#{head}") -> InlineHTML:
    """The circuit of ``lens_attn.circuit(model)`` as an inline SVG graph (``render.circuit_graph``):
    heads coloured by label, edges by input and effect, hover for the numbers."""
    from lens_attn.render.circuit_graph import circuit_svg

    return InlineHTML(f'<div class="lens-attn-circuit">{circuit_svg(circuit, href=href)}</div>')
