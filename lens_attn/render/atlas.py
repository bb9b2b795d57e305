"""The atlas page: a scatter of every head and one page per head, offline, from ``file://``.

    >>> head_atlas = lens_attn.atlas(model, ["The cat sat on the mat. The cat sat."], progress=False)
    >>> render_atlas(head_atlas, tmp_path / "atlas").name     # and heads/L0H0.js ... L3H7.js
    'index.html'

``index.html`` holds the per-head table (every metric, every score, the labels) and draws the
scatter: x, y and colour are chosen from any of those quantities. Clicking a head (or opening
``index.html#L1H5``) loads ``heads/L1H5.js`` with a ``<script>`` element, which works from
``file://`` without a server, so a model of 1024+ heads costs the page only the heads you open.
A head's page shows its labels and their confirmations (given by ``discover``), its top examples
with the query token boxed and the attended keys shaded, its decile samples, its OV and QK tables,
its patterns on the two probes and the PCA of its output vectors.

Circuit graph slot. ``render_atlas(circuit_svg=...)`` takes an SVG string from the circuit stage and
shows it in the section ``circuit-graph-slot``, as an ``<img>`` of a ``data:`` URL: an SVG shown as an
image runs no script. Without it the section stays hidden.

Security, as the report (``lens_attn.render.report``): every string of the data travels as JSON with
``<``, ``>``, ``&``, U+2028/9 written as ``\\uXXXX`` (inline, and in the head scripts as the argument
of ``lensAtlasHead(...)``), the page puts strings into the DOM with ``textContent`` only, bidi
controls in tokens are shown escaped, and the Content-Security-Policy allows only the page's own
script (by hash) and the scripts it creates (``'strict-dynamic'``: the head files), never inline
handlers or scripts that a text could smuggle in.
"""

import base64
import functools
import hashlib
import html
import json
import math
import os
from pathlib import Path

from lens_attn.files import dumps_strict, write_text_atomic
from lens_attn.heads import head_label
from lens_attn.render.notebook import script_safe_json
from lens_attn.text import escape_bidi

DEFAULT_TITLE = "lens-attn head atlas"
DATA_ELEMENT_ID = "lens-atlas-data"
ASSETS = Path(__file__).parent / "assets"
HEADS_DIR = "heads"
PATTERN_DIGITS = 3  # probe patterns are stored rounded to this many decimals


def _number(value):
    value = float(value)
    return float(f"{value:.5g}") if math.isfinite(value) else None


def _safe(text: str) -> str:
    return escape_bidi(str(text))


def _example(row) -> dict:
    return {
        "doc": int(row["doc"]),
        "query_pos": int(row["query_pos"]),
        "activation": _number(row["activation"]),
        "context": [_safe(t) for t in row["context"]],
        "context_query": int(row["context_query"]),
        "keys": [
            {
                "key_pos": k["key_pos"],
                "offset": k["offset"],
                "token": _safe(k["token"]),
                "weight": round(k["weight"], 4),
            }
            for k in row["keys"]
        ],  # fmt: skip
    }


def index_data(head_atlas, *, scores=None, labels=None, open_head=None, circuit_svg=None) -> dict:
    """What ``index.html`` embeds: the heads and their quantities, the probes, the provenance."""
    table = head_atlas.to_dataframe()
    numeric = [c for c in table.columns if c not in ("name",)]
    quantities = [{"name": c, "kind": "number"} for c in numeric]
    score_grids = {}
    if scores is not None:
        for name in scores.names:
            score_grids[f"score: {name}"] = scores[name]
            quantities.append({"name": f"score: {name}", "kind": "number"})
    if labels is not None:
        quantities.append({"name": "label", "kind": "category"})
    heads = []
    for row in table.to_dict("records"):
        layer, head = int(row["layer"]), int(row["head"])
        values = {c: _number(row[c]) for c in numeric}
        for name, grid in score_grids.items():
            values[name] = _number(grid[layer, head])
        if labels is not None:
            names = labels.get(head_label(layer, head)) or []
            values["label"] = _safe("+".join(names)) if names else None
        heads.append({"name": row["name"], "layer": layer, "head": head, "values": values})
    n_tokens = head_atlas.provenance.get("n_tokens")
    return {
        "heads": heads,
        "quantities": quantities,
        "default_axes": ["layer", "induction", "label" if labels is not None else "bos"],
        "probes": [
            {"name": p["name"], "tokens": [_safe(t) for t in p["tokens"]]}
            for p in head_atlas.probes
        ],  # fmt: skip
        "open_head": open_head or _strongest(table),
        "summary": f"{len(heads)} heads of {head_atlas.n_layers} layers over {n_tokens} tokens; "
        f"activation = ||z W_O||, the norm of a head's write into the residual stream.",
        "provenance": json.loads(dumps_strict(head_atlas.provenance, default=str)),
        "circuit_svg": None
        if circuit_svg is None
        else base64.b64encode(circuit_svg.encode("utf-8")).decode("ascii"),
    }


def _strongest(table) -> str:
    """The head the page opens on: the highest corpus induction share, else the first head."""
    column = table["induction"].fillna(-1)
    return str(table.loc[column.idxmax(), "name"]) if len(table) else ""


def head_data(head_atlas, layer: int, head: int, *, notes=None) -> dict:
    """What ``heads/<name>.js`` holds for one head."""
    name = head_label(layer, head)
    top = head_atlas.top_examples((layer, head))
    deciles = head_atlas.decile_examples((layer, head))
    decile_rows = []
    for row in deciles.to_dict("records"):
        decile_rows.append({**_example(row), "decile": int(row["decile"])})
    probes = []
    for probe in head_atlas.probes:
        pattern = probe["pattern"][layer, head]
        probes.append([[round(float(w), PATTERN_DIGITS) for w in row] for row in pattern])
    ov = [{"source": _safe(r["source"]), "weight": r["weight"],
           "top": [[_safe(t), v] for t, v in r["top"]]} for r in head_atlas.ov.get(name, [])]  # fmt: skip
    qk = [{"query": _safe(r["query"]), "key": _safe(r["key"]), "score": r["score"]}
          for r in head_atlas.qk.get(name, [])]  # fmt: skip
    return {
        "name": name,
        "notes": [_safe(line) for line in (notes or {}).get(name, [])],
        "top": [_example(row) for row in top.to_dict("records")],
        "deciles": decile_rows,
        "ov": ov,
        "qk": qk,
        "pca": head_atlas.pca.get(name),
        "probes": probes,
    }


@functools.cache
def _asset(name: str) -> str:
    return (ASSETS / name).read_text(encoding="utf-8")


def _csp_hash(script: str) -> str:
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
    return f"'sha256-{digest}'"


def atlas_files(head_atlas, *, scores=None, labels=None, notes=None, title: str = DEFAULT_TITLE,
                open_head=None, circuit_svg: str | None = None) -> dict[str, str]:  # fmt: skip
    """Every file of the atlas page, ``{relative path: text}``: ``index.html`` and one
    ``heads/<name>.js`` per head (see the module docstring). ``labels``: ``{"L1H5": ["induction"]}``;
    ``notes``: ``{"L1H5": [lines]}`` (labels' confirmations); ``scores``: a ``HeadScores``."""
    data = index_data(head_atlas, scores=scores, labels=labels, open_head=open_head,
                      circuit_svg=circuit_svg)  # fmt: skip
    data_json = script_safe_json(json.dumps(data, allow_nan=False, separators=(",", ":")))
    app = _asset("atlas.js").replace("@DATA_ELEMENT_ID@", DATA_ELEMENT_ID)
    csp = (
        "default-src 'none'; "
        f"script-src {_csp_hash(app)} 'strict-dynamic'; "
        "style-src 'unsafe-inline'; img-src data:"
    )
    page = _asset("atlas.html").format(
        csp=csp, title=html.escape(escape_bidi(title)), style=_asset("atlas.css"),
        data_element_id=DATA_ELEMENT_ID, data=data_json, app=app,
    )  # fmt: skip
    files = {"index.html": page}
    for layer in range(head_atlas.n_layers):
        for head in range(head_atlas.n_heads):
            payload = head_data(head_atlas, layer, head, notes=notes)
            text = script_safe_json(json.dumps(payload, allow_nan=False, separators=(",", ":")))
            name = head_label(layer, head)
            files[f"{HEADS_DIR}/{name}.js"] = f"lensAtlasHead({json.dumps(name)}, {text});\n"
    return files


def render_atlas(head_atlas, out: "str | os.PathLike", *, folder=None, **kwargs) -> Path:
    """Write the atlas page into the folder ``out`` (``index.html``, ``heads/``); return
    ``out/index.html``. With ``folder`` (a ``lens_attn.runs.RunFolder``), every file is written
    through it, so the run records it; otherwise each is written atomically. ``kwargs``: those of
    :func:`atlas_files`."""
    out = Path(out)
    for relative, text in atlas_files(head_atlas, **kwargs).items():
        if folder is not None:
            folder.write_text(Path(out).relative_to(folder.out) / relative, text)
        else:
            (out / relative).parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(out / relative, text)
    return out / "index.html"
