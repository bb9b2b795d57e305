"""A circuit as a standalone SVG graph (no external library): heads by layer, edges by effect.

    >>> result = lens_attn.circuit(model, ["L1H3"], top_k=4, faithfulness=False)
    >>> svg = circuit_svg(result)
    >>> svg.startswith("<svg")
    True
    >>> 'href="atlas/L0H0.html"' in circuit_svg(result, href="atlas/{head}.html")  # node links
    True

Layout: one column per layer (left to right), the heads of the circuit stacked in it, a
``logits`` node on the right. A head node is coloured by its first label (grey: none) and is a link
(``href`` with ``{head}`` replaced by ``"L3H5"``; the default ``#{head}`` opens the head in the
report, whose page follows ``#L3H5``). An edge is coloured by the input it enters (q, k, v,
logits), and its width and opacity grow with its effect as a fraction of what the receiver had
(``Edge.fraction``; a direct edge: of the strongest direct edge); hovering shows the numbers. Every text in the SVG is XML-escaped.
"""

import html

LABEL_COLOURS = {  # the label's colour (first label wins), in the report's palette
    "previous_token": "#1f77b4",
    "induction": "#d62728",
    "duplicate_token": "#9467bd",
    "current_token": "#2ca02c",
    "attention_sink": "#7f7f7f",
    "copying": "#ff7f0e",
}
NO_LABEL = "#c7c7c7"
INPUT_COLOURS = {"q": "#1f77b4", "k": "#ff7f0e", "v": "#2ca02c", "logits": "#9467bd"}
COLUMN, ROW, RADIUS, MARGIN = 110, 44, 17, 40  # pixels


def _edges(circuit) -> list:
    if hasattr(circuit, "circuit_edges"):
        return circuit.circuit_edges()
    return list(circuit)


def circuit_svg(
    circuit,
    labels: "dict[str, list[str]] | None" = None,
    *,
    href: str = "#{head}",
    title: str = "circuit",
) -> str:
    """The SVG (a string) of ``circuit``: a ``CircuitResult`` (its kept edges and labels) or a list
    of ``Edge``. ``labels``: head name -> labels (default: the result's)."""
    from lens_attn.heads import read_head

    edges = _edges(circuit)
    labels = labels if labels is not None else dict(getattr(circuit, "labels", {}) or {})
    heads = {e.sender for e in edges} | {e.receiver for e in edges if e.receiver != "logits"}
    heads |= set(getattr(circuit, "receivers", {}) or {})
    place = {}
    by_layer: dict[int, list[tuple[int, str]]] = {}
    for name in heads:
        layer, head = read_head(name)
        by_layer.setdefault(layer, []).append((head, name))
    layers = sorted(by_layer)
    tallest = max((len(v) for v in by_layer.values()), default=1)
    height = 2 * MARGIN + tallest * ROW
    for column, layer in enumerate(layers):
        for row, (_, name) in enumerate(sorted(by_layer[layer])):
            offset = (tallest - len(by_layer[layer])) * ROW / 2
            place[name] = (MARGIN + column * COLUMN, MARGIN + offset + row * ROW + ROW / 2)
    width = 2 * MARGIN + max(len(layers), 1) * COLUMN
    place["logits"] = (width - MARGIN, height / 2)
    width = max(width + COLUMN // 2, 480)  # room for the legend
    strongest_direct = max((e.effect for e in edges if e.input == "logits"), default=0.0)

    def share(e) -> float:
        """Width and opacity: the share of the receiver's score (logits: of the top direct edge)."""
        value = e.effect / strongest_direct if e.input == "logits" else e.fraction
        return min(max(value, 0.0), 1.0) if value == value else 0.0  # NaN: thinnest

    esc = html.escape

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="lens-attn-circuit" width="{width}" '
        f'height="{height + 40}" viewBox="0 0 {width} {height + 40}" font-family="sans-serif" '
        f'font-size="11"><title>{esc(title)}</title>'
    ]
    for column, layer in enumerate(layers):
        parts.append(f'<text x="{MARGIN + column * COLUMN}" y="14" text-anchor="middle" '
                     f'fill="#555">layer {layer}</text>')  # fmt: skip
    for e in sorted(edges, key=share):  # the strongest drawn last, on top
        (x1, y1), (x2, y2) = place[e.sender], place[e.receiver]
        weight = share(e)
        bend = (x2 - x1) / 2
        parts.append(
            f'<path d="M{x1 + RADIUS:.1f},{y1:.1f} C{x1 + bend:.1f},{y1:.1f} {x2 - bend:.1f},'
            f'{y2:.1f} {x2 - RADIUS:.1f},{y2:.1f}" fill="none" stroke="{INPUT_COLOURS[e.input]}" '
            f'stroke-width="{1 + 5 * weight:.1f}" stroke-opacity="{0.25 + 0.75 * weight:.2f}">'
            f"<title>{esc(e.name)}: effect {e.effect:.3f} ± {e.stderr:.3f} "
            f"({e.fraction:.0%} of the receiver's {esc(e.metric)})</title></path>"
        )
    for name in sorted(heads):
        x, y = place[name]
        head_labels = labels.get(name, [])
        colour = LABEL_COLOURS.get(head_labels[0], NO_LABEL) if head_labels else NO_LABEL
        tip = f"{name}: {', '.join(head_labels) or 'no label'}"
        parts.append(
            f'<a href="{esc(href.format(head=name))}"><g class="head"><title>{esc(tip)}</title>'
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{RADIUS}" fill="{colour}" stroke="#333"/>'
            f'<text x="{x:.1f}" y="{y + 4:.1f}" text-anchor="middle" font-size="9" '
            f'fill="#000">{esc(name)}</text></g></a>'
        )
    if any(e.receiver == "logits" for e in edges):
        x, y = place["logits"]
        parts.append(f'<rect x="{x - 24:.1f}" y="{y - 12:.1f}" width="48" height="24" rx="4" '
                     f'fill="#eee" stroke="#333"/><text x="{x:.1f}" y="{y + 4:.1f}" '
                     'text-anchor="middle">logits</text>')  # fmt: skip
    legend = " ".join(f'<tspan fill="{c}">━ {kind}</tspan>' for kind, c in INPUT_COLOURS.items())
    parts.append(f'<text x="{MARGIN - 20}" y="{height + 14}">{legend}  '
                 "(edge width: share of the receiver's score removed)</text>")  # fmt: skip
    shown = sorted({labels[h][0] for h in heads if labels.get(h)} & set(LABEL_COLOURS))
    if shown:
        dots = " ".join(f'<tspan fill="{LABEL_COLOURS[x]}">●</tspan> {esc(x)}' for x in shown)
        parts.append(f'<text x="{MARGIN - 20}" y="{height + 30}">heads: {dots}</text>')
    parts.append("</svg>")
    return "".join(parts)
