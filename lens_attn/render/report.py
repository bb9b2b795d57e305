"""A self-contained, offline HTML report of attention patterns (and head scores).

    >>> patterns = lens_attn.capture_patterns(model, "The cat sat on the mat. The cat")
    >>> scores = lens_attn.score_heads(model, progress=False)
    >>> render_report(patterns, scores, path=tmp_path / "report.html").name
    'report.html'

One ``.html`` file that works from ``file://`` with the network off: a prompt/layer/head/query
selector, CircuitsVis's ``AttentionHeads`` view of the chosen layer, the chosen head's
``AttentionPattern`` and the chosen query's attention over the tokens (``ColoredTokens``), and,
given ``HeadScores``, a layer x head grid of any score where clicking a cell opens that head.
``report.html#L1H3`` opens head L1H3.

Size. CircuitsVis's own ``render`` inlines its 1.3 MB JavaScript bundle and the patterns as JSON
floats into every view. Here the bundle is embedded once per file and the views are rendered in the
browser from compact data: each head's pattern is stored as its lower triangle (causal attention is
zero above the diagonal; a full matrix is stored when it is not), quantised to uint8 with a per-head
scale ``scale = max weight`` (``weight ~= byte * scale / 255``, error <= scale / 510 <= 0.002), and
the bytes of all heads of a layer are base64-encoded as one string: ``n_heads * n(n+1)/2 * 4/3``
bytes per layer.

Measured by ``experiments/bench_render.py`` (the bundled checkpoint, all 4 layers x 8 heads, one
128-token prompt): this report is 1.66 MB (1.30 MB bundle, 0.36 MB patterns, tokens and page)
against 12.52 MB for CircuitsVis's ``attention_heads`` of the same patterns, one view per layer,
summed: a ratio of 0.132 (target <= 0.25).

Security. Every string from the data (tokens, score names, provenance) travels inside a ``<script
type="application/json">`` block with ``<``, ``>``, ``&``, U+2028 and U+2029 written as ``\\uXXXX``,
so no token can close the block; the page reads it with ``JSON.parse`` and puts strings into the DOM
with ``textContent`` only. CircuitsVis's ``ColoredTokens`` inserts tokens as HTML, so the page
HTML-escapes them before passing them in. The title is HTML-escaped. Bidirectional control
characters (U+202E and its relatives) in tokens and the title are shown escaped, as ``\u202e``
(``lens_attn.text.escape_bidi``), so they cannot reorder what the page displays. A Content-Security-Policy
allows only the two embedded scripts (by SHA-256 hash), so even an injected inline handler would not
run.
"""

import base64
import functools
import hashlib
import html
import json
import math
import os
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from lens_attn.patterns import AttentionPatterns
from lens_attn.render.notebook import script_safe_json
from lens_attn.text import escape_bidi

DEFAULT_TITLE = "lens-attn attention report"
DATA_ELEMENT_ID = "lens-attn-data"  # the JSON data element the page script reads
ASSETS = Path(__file__).parent / "assets"  # report.html (the page), report.js, report.css


# ----------------------------------------------------------------------------------------- encoding


def quantize_head(values: Float[Tensor, " n"]) -> tuple[float, bytes]:
    """Weights ``>= 0`` -> ``(scale, bytes)`` with ``weight ~= byte * scale / 255``, scale = max."""
    values = values.detach().float().cpu().clamp(min=0.0)
    scale = float(values.max()) if values.numel() else 0.0
    scale = scale if scale > 0 else 1.0
    q = torch.round(values / scale * 255).clamp(0, 255).to(torch.uint8)
    return scale, q.numpy().tobytes()


def _lower_triangle(pattern: Tensor) -> Tensor:
    n = pattern.shape[-1]
    rows, cols = torch.tril_indices(n, n)  # row-major: (0,0), (1,0), (1,1), (2,0), ...
    return pattern[..., rows, cols]


def encode_layer(maps: Float[Tensor, "head_index query_pos key_pos"]) -> dict:
    """One layer of one prompt as ``{"tri", "scales", "data"}`` (see the module docstring)."""
    maps = maps.detach().float().cpu()
    tri = bool((torch.triu(maps, diagonal=1) == 0).all())
    flat = _lower_triangle(maps) if tri else maps.flatten(1)  # [head_index, entries]
    scales, chunks = [], []
    for head_values in flat:
        scale, data = quantize_head(head_values)
        scales.append(float(f"{scale:.7g}"))
        chunks.append(data)
    return {
        "tri": tri,
        "scales": scales,
        "data": base64.b64encode(b"".join(chunks)).decode("ascii"),
    }


def decode_layer(entry: dict, n: int) -> Float[Tensor, "head_index query_pos key_pos"]:
    """Inverse of ``encode_layer`` up to quantisation (the page's JavaScript does the same)."""
    data = torch.frombuffer(bytearray(base64.b64decode(entry["data"])), dtype=torch.uint8).float()
    n_heads = len(entry["scales"])
    scales = torch.tensor(entry["scales"], dtype=torch.float32)[:, None] / 255
    flat = data.reshape(n_heads, -1) * scales
    if not entry["tri"]:
        return flat.reshape(n_heads, n, n)
    out = torch.zeros(n_heads, n, n)
    rows, cols = torch.tril_indices(n, n)
    out[:, rows, cols] = flat
    return out


def _finite_or_none(value: float):
    return float(f"{value:.6g}") if math.isfinite(value) else None


def _scores_payload(scores, n_heads: int) -> dict | None:
    if scores is None:
        return None
    if scores.n_heads != n_heads:
        raise ValueError(
            f"scores have {scores.n_heads} heads per layer but the patterns have {n_heads}"
        )
    grids = dict(scores.values)
    for kind, sub in getattr(scores, "per_probe_set", {}).items():  # "induction@repeated_random"
        grids.update({f"{name}@{kind}": grid for name, grid in sub.values.items()})
    values = {
        name: [[_finite_or_none(float(v)) for v in row] for row in grid.detach().float().cpu()]
        for name, grid in grids.items()
    }
    return {"names": list(values), "n_layers": scores.n_layers, "values": values}


def report_data(
    patterns: AttentionPatterns, scores=None, *, open_head=None, open_score=None, heads=None
) -> dict:
    """Everything the page shows, as one JSON-ready dict.

    ``heads``: ``{"L1H5": ["induction", "repeated_random/induction_loss: +0.23 ... yes"], ...}``,
    lines shown next to that head's pattern (``discover`` gives labels, verdicts and effects).
    """
    prompts = []
    for batch, tokens in enumerate(patterns.str_tokens):
        layers = [encode_layer(patterns.layer(layer, batch)) for layer in patterns.layers]
        shown = [escape_bidi(t) for t in tokens]  # bidi controls would reorder the display
        prompts.append({"tokens": shown, "n": len(tokens), "layers": layers})
    provenance = getattr(scores, "provenance", None) or {}
    return {
        "n_heads": patterns.n_heads,
        "layers": list(patterns.layers),
        "prompts": prompts,
        "scores": _scores_payload(scores, patterns.n_heads),
        "provenance": json.loads(json.dumps(provenance, default=str)),
        "open_head": None
        if open_head is None
        else list(patterns.parse_head(open_head, what="open_head")),
        "open_score": open_score,
        "heads": {k: [str(x) for x in v] for k, v in (heads or {}).items()},
    }


# --------------------------------------------------------------------------------------------- page


@functools.cache
def circuitsvis_bundle() -> str:
    """CircuitsVis's browser bundle (``circuitsvis/dist/cdn/iife.js``), made safe to inline once."""
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    if not path.is_file():
        raise FileNotFoundError(
            f"CircuitsVis's JavaScript bundle is missing at {path}; reinstall circuitsvis"
        )
    js = path.read_text(encoding="utf-8")
    # "</script" only occurs inside a string literal of the bundle; "<\/script" is the same string
    # and cannot end the inline script (CircuitsVis's own render deletes the text instead)
    js = js.replace("</script", "<\\/script").replace("</SCRIPT", "<\\/SCRIPT")
    js = js.replace("<!--", "<\\!--")
    return js.split("\n//# sourceMappingURL=")[0]  # the map file is not shipped with the report


def _csp_hash(script: str) -> str:
    return (
        "'sha256-"
        + base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
        + "'"
    )


def render_html(
    patterns: AttentionPatterns,
    scores=None,
    *,
    title: str = DEFAULT_TITLE,
    open_head=None,
    open_score=None,
    heads=None,
    circuit=None,
) -> str:
    """The report page as a string (see ``render_report``)."""
    data = report_data(patterns, scores, open_head=open_head, open_score=open_score, heads=heads)
    data = script_safe_json(json.dumps(data, allow_nan=False, separators=(",", ":")))
    bundle = circuitsvis_bundle()
    app = _asset("report.js").replace("@DATA_ELEMENT_ID@", DATA_ELEMENT_ID)
    csp = (
        "default-src 'none'; "
        f"script-src {_csp_hash(bundle)} {_csp_hash(app)}; "
        "style-src 'unsafe-inline'; img-src data: blob:"
    )
    return _asset("report.html").format(
        csp=csp, title=html.escape(escape_bidi(title)), style=_asset("report.css"),
        data_element_id=DATA_ELEMENT_ID, data=data, bundle=bundle, app=app,
        circuit=_circuit_section(circuit),
    )  # fmt: skip


def _circuit_section(circuit) -> str:
    """The circuit graph's section (``render.circuit_graph``; nodes open their head), or ``""``."""
    if circuit is None:
        return ""
    from lens_attn.render.circuit_graph import circuit_svg

    return (
        '<section id="circuit-section"><h2>Circuit</h2><p class="note">Which heads feed which '
        "(path patching; lens_attn.circuit). Click a head to open it.</p>"
        f"{circuit_svg(circuit)}</section>"
    )


@functools.cache
def _asset(name: str) -> str:
    """A file of the report's web app, shipped as package data in ``lens_attn/render/assets``."""
    return (ASSETS / name).read_text(encoding="utf-8")


def render_report(
    patterns: AttentionPatterns,
    scores=None,
    *,
    path: str | os.PathLike,
    title: str = DEFAULT_TITLE,
    open_head: str | tuple[int, int] | None = None,
    open_score: str | None = None,
    heads: dict | None = None,
    circuit=None,
) -> Path:
    """Write the offline HTML report to ``path`` (a ``.html`` file, written atomically); return it.

    Args:
        patterns: from ``capture_patterns``; every prompt and captured layer goes into the report.
        scores: optional ``HeadScores`` for the clickable layer x head score grid.
        title: page title (HTML-escaped).
        open_head: the head shown when the page opens, ``"L1H3"`` or ``(1, 3)``; ``None`` shows the
            first head of the first captured layer. A ``#L1H3`` link overrides it.
        open_score: the score the grid shows first (a name in ``scores``, or ``name@kind`` for a
            per-probe-set grid); ``None``: the first.
        heads: ``{"L1H5": [lines]}`` shown next to each head's pattern (labels, verdicts, effects).
        circuit: a ``CircuitResult`` (``lens_attn.circuit``), drawn as a graph whose nodes open
            their head.
    """
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"the report path must end in .html, got {str(path)!r}")
    page = render_html(patterns, scores, title=title, open_head=open_head, open_score=open_score,
                       heads=heads, circuit=circuit)  # fmt: skip
    from lens_attn.files import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, page)
