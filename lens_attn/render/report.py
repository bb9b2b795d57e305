"""A self-contained, offline HTML report of attention patterns (and head scores).

    >>> patterns = lens_attn.capture_patterns(model, "The cat sat on the mat. The cat")
    >>> render_report(patterns, scores, path="runs/demo/report.html")

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

from lens_attn.circuits import script_safe_json
from lens_attn.patterns import AttentionPatterns
from lens_attn.text import escape_bidi

DEFAULT_TITLE = "lens-attn attention report"
DATA_ELEMENT_ID = "lens-attn-data"


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
    values = {
        name: [[_finite_or_none(float(v)) for v in row] for row in grid.detach().float().cpu()]
        for name, grid in scores.values.items()
    }
    return {"names": list(values), "n_layers": scores.n_layers, "values": values}


def _check_head(patterns: AttentionPatterns, head) -> list[int] | None:
    if head is None:
        return None
    from lens_attn.results import parse_head

    layer, index = parse_head(head, max(patterns.layers) + 1, patterns.n_heads)
    if layer not in patterns.layers:
        raise ValueError(
            f"open_head {head!r}: layer {layer} was not captured; captured: {patterns.layers}"
        )
    return [layer, index]


def report_data(patterns: AttentionPatterns, scores=None, *, open_head=None) -> dict:
    """Everything the page shows, as one JSON-ready dict."""
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
        "open_head": _check_head(patterns, open_head),
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


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.4em; }
.controls { display: flex; flex-wrap: wrap; gap: 1em; align-items: center; padding: .6em;
  background: #f4f4f4; border-radius: 6px; position: sticky; top: 0; z-index: 2000; }
.prompt { white-space: pre-wrap; background: #fafafa; border: 1px solid #ddd; padding: .5em;
  max-height: 8em; overflow: auto; }
.row { display: flex; flex-wrap: wrap; gap: 2em; } .row > div { flex: 1 1 380px; min-width: 320px; }
#score-grid { border-collapse: collapse; font-size: 12px; }
#score-grid td, #score-grid th { border: 1px solid #ccc; padding: 3px 6px; text-align: center; }
#score-grid td { cursor: pointer; } #score-grid td.missing { cursor: default; color: #999; }
#score-grid td.selected { outline: 3px solid #d62728; outline-offset: -3px; }
.note { color: #666; font-size: .9em; } pre { font-size: 11px; color: #555; }
"""

# The page script: reads the JSON data, decodes patterns, renders CircuitsVis views client-side.
_APP = r"""
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("lens-attn-data").textContent);
  const $ = (id) => document.getElementById(id);
  const state = { prompt: 0, layer: 0, head: 0, query: 0 };  // layer indexes DATA.layers
  const decoded = new Map();
  let nextView = 0;

  const ENTITIES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const escapeHtml = (s) => s.replace(/[&<>"']/g, (c) => ENTITIES[c]);

  // base64 bytes -> [head][query_pos][key_pos] floats (see the Python module docstring)
  function decode(prompt, li) {
    const key = prompt + ":" + li;
    if (decoded.has(key)) return decoded.get(key);
    const p = DATA.prompts[prompt], entry = p.layers[li], n = p.n;
    const bin = atob(entry.data);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    const heads = [];
    let o = 0;
    for (let h = 0; h < DATA.n_heads; h++) {
      const step = entry.scales[h] / 255, rows = [];
      for (let q = 0; q < n; q++) {
        const row = new Array(n).fill(0), end = entry.tri ? q + 1 : n;
        for (let k = 0; k < end; k++) row[k] = bytes[o++] * step;
        rows.push(row);
      }
      heads.push(rows);
    }
    decoded.set(key, heads);
    return heads;
  }

  // a fresh div for every view: CircuitsVis.render makes a new React root on the element given
  function mount(hostId, component, props) {
    const host = $(hostId), div = document.createElement("div");
    div.id = "lens-attn-view-" + (nextView++);
    host.replaceChildren(div);
    if (typeof CircuitsVis === "undefined") {
      div.textContent = "CircuitsVis failed to load.";
      return;
    }
    CircuitsVis.render(div.id, CircuitsVis[component], props);
  }

  function option(select, value, text) {
    const o = document.createElement("option");
    o.value = String(value);
    o.textContent = text;
    select.appendChild(o);
  }
  const label = (li, h) => "L" + DATA.layers[li] + "H" + h;
  const tokens = () => DATA.prompts[state.prompt].tokens;

  function fillQueries() {
    const sel = $("query-select");
    sel.replaceChildren();
    tokens().forEach((t, i) => option(sel, i, i + ": " + JSON.stringify(t)));
    state.query = tokens().length - 1;
    sel.value = String(state.query);
  }

  function renderLayer() {
    const heads = decode(state.prompt, state.layer);
    $("layer-heading").textContent =
      "Layer " + DATA.layers[state.layer] + ": every head (CircuitsVis AttentionHeads)";
    mount("layer-view", "AttentionHeads", {
      attention: heads,
      tokens: tokens(),  // drawn on a canvas as text
      attentionHeadNames: heads.map((_, h) => label(state.layer, h)),
    });
  }

  function renderHead() {
    const pattern = decode(state.prompt, state.layer)[state.head];
    $("head-heading").textContent = "Head " + label(state.layer, state.head);
    mount("head-view", "AttentionPattern", { attention: pattern, tokens: tokens() });
    const row = pattern[state.query];
    $("query-heading").textContent = "Attention of query " + state.query + " " +
      JSON.stringify(tokens()[state.query]) + " over the keys";
    mount("query-view", "ColoredTokens", {
      tokens: tokens().map(escapeHtml),  // ColoredTokens inserts tokens as HTML
      values: row,
      minValue: 0,
      maxValue: Math.max(...row, 1e-9),
    });
    for (const td of document.querySelectorAll("#score-grid td.selected")) {
      td.classList.remove("selected");
    }
    const cell = $("cell-" + DATA.layers[state.layer] + "-" + state.head);
    if (cell) cell.classList.add("selected");
  }

  function openHead(layer, head, scroll) {
    const li = DATA.layers.indexOf(layer);
    if (li < 0 || head < 0 || head >= DATA.n_heads) return false;
    const layerChanged = li !== state.layer;
    state.layer = li;
    state.head = head;
    $("layer-select").value = String(li);
    $("head-select").value = String(head);
    if (layerChanged) renderLayer();
    renderHead();
    if (scroll) $("head-section").scrollIntoView();
    return true;
  }

  function scoreColour(v, lo, hi) {
    const t = hi > lo ? (v - lo) / (hi - lo) : 0.5;
    return "rgb(" + Math.round(255 - 200 * t) + "," + Math.round(255 - 120 * t) + ",255)";
  }

  function renderScores() {
    const name = $("score-select").value, grid = DATA.scores.values[name];
    const finite = grid.flat().filter((v) => v !== null);
    const lo = Math.min(...finite), hi = Math.max(...finite);
    const table = $("score-grid");
    table.replaceChildren();
    const top = table.insertRow(), corner = document.createElement("th");
    corner.textContent = "layer \\ head";
    top.appendChild(corner);
    for (let h = 0; h < DATA.n_heads; h++) {
      const th = document.createElement("th");
      th.textContent = String(h);
      top.appendChild(th);
    }
    grid.forEach((values, layer) => {
      const tr = table.insertRow(), th = document.createElement("th");
      th.textContent = String(layer);
      tr.appendChild(th);
      values.forEach((v, h) => {
        const td = tr.insertCell();
        td.id = "cell-" + layer + "-" + h;
        td.textContent = v === null ? "-" : v.toFixed(2);
        td.title = "L" + layer + "H" + h + " " + name + " = " + (v === null ? "n/a" : v);
        if (v !== null) td.style.background = scoreColour(v, lo, hi);
        if (DATA.layers.includes(layer)) {
          td.addEventListener("click", () => openHead(layer, h, true));
        } else {
          td.classList.add("missing");
          td.title += " (layer not captured)";
        }
      });
    });
    renderHead();
  }

  function showPrompt() {
    $("prompt-text").textContent = tokens().join("");
    fillQueries();
  }

  const promptSel = $("prompt-select"), layerSel = $("layer-select"), headSel = $("head-select");
  DATA.prompts.forEach((p, i) => option(promptSel, i, "prompt " + i + " (" + p.n + " tokens)"));
  DATA.layers.forEach((l, i) => option(layerSel, i, "layer " + l));
  for (let h = 0; h < DATA.n_heads; h++) option(headSel, h, "head " + h);
  if (DATA.prompts.length < 2) $("prompt-control").hidden = true;
  promptSel.addEventListener("change", () => {
    state.prompt = +promptSel.value;
    showPrompt();
    renderLayer();
    renderHead();
  });
  layerSel.addEventListener("change", () => {
    state.layer = +layerSel.value;
    renderLayer();
    renderHead();
  });
  headSel.addEventListener("change", () => {
    state.head = +headSel.value;
    renderHead();
  });
  $("query-select").addEventListener("change", () => {
    state.query = +$("query-select").value;
    renderHead();
  });

  showPrompt();
  $("summary").textContent = DATA.prompts.length + " prompt(s); layers " +
    DATA.layers.join(", ") + "; " + DATA.n_heads + " heads per layer";
  if (Object.keys(DATA.provenance).length) {
    $("provenance").textContent = JSON.stringify(DATA.provenance, null, 1);
  }
  renderLayer();
  if (DATA.scores) {
    DATA.scores.names.forEach((n) => option($("score-select"), n, n));
    $("score-select").addEventListener("change", renderScores);
    renderScores();
  } else {
    $("scores-section").hidden = true;
    renderHead();
  }
  const m = /^#L(\d+)H(\d+)$/.exec(location.hash);
  if (m) openHead(+m[1], +m[2], true);
  else if (DATA.open_head) openHead(DATA.open_head[0], DATA.open_head[1], false);
})();
"""

_BODY = """<h1>{title}</h1>
<p id="summary" class="note"></p>
<div class="prompt" id="prompt-text"></div>
<div class="controls">
  <label id="prompt-control">Prompt <select id="prompt-select"></select></label>
  <label>Layer <select id="layer-select"></select></label>
  <label>Head <select id="head-select"></select></label>
  <label>Query <select id="query-select"></select></label>
</div>
<section id="scores-section"><h2>Head scores</h2>
  <p class="note">Click a cell to open that head.
    <label>Score <select id="score-select"></select></label></p>
  <table id="score-grid"></table>
</section>
<section id="head-section"><h2 id="head-heading"></h2>
  <div class="row"><div id="head-view"></div>
  <div><h3 id="query-heading"></h3><div id="query-view"></div></div></div>
</section>
<section id="layer-section"><h2 id="layer-heading"></h2><div id="layer-view"></div></section>
<pre id="provenance"></pre>
"""


def render_html(
    patterns: AttentionPatterns, scores=None, *, title: str = DEFAULT_TITLE, open_head=None
) -> str:
    """The report page as a string (see ``render_report``)."""
    data = report_data(patterns, scores, open_head=open_head)
    data = script_safe_json(json.dumps(data, allow_nan=False, separators=(",", ":")))
    bundle = circuitsvis_bundle()
    csp = (
        "default-src 'none'; "
        f"script-src {_csp_hash(bundle)} {_csp_hash(_APP)}; "
        "style-src 'unsafe-inline'; img-src data: blob:"
    )
    safe_title = html.escape(escape_bidi(title))
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
        f"<title>{safe_title}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        + _BODY.format(title=safe_title)
        + f'<script type="application/json" id="{DATA_ELEMENT_ID}">{data}</script>\n'
        + f"<script>{bundle}</script>\n<script>{_APP}</script>\n</body>\n</html>\n"
    )


def render_report(
    patterns: AttentionPatterns,
    scores=None,
    *,
    path: str | os.PathLike,
    title: str = DEFAULT_TITLE,
    open_head: str | tuple[int, int] | None = None,
) -> Path:
    """Write the offline HTML report to ``path`` (a ``.html`` file, written atomically); return it.

    Args:
        patterns: from ``capture_patterns``; every prompt and captured layer goes into the report.
        scores: optional ``HeadScores`` for the clickable layer x head score grid.
        title: page title (HTML-escaped).
        open_head: the head shown when the page opens, ``"L1H3"`` or ``(1, 3)``; ``None`` shows the
            first head of the first captured layer. A ``#L1H3`` link overrides it.
    """
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"the report path must end in .html, got {str(path)!r}")
    page = render_html(patterns, scores, title=title, open_head=open_head)
    from lens_attn.runs import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, page)
