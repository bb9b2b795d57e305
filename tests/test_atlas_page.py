"""Tests for the atlas page (lens_attn.render.atlas) and ``lens-attn atlas``: escaping of corpus
text, the CSP, the lazily loaded head files, the run folder, and a real browser (Debian's chromium,
network blocked; see tests/test_report.py, whose harness and payloads are reused here)."""

import json
import re

import pandas as pd
import pytest
import torch
from test_report import (  # noqa: F401  (chromium is a fixture)
    IMG_INJECTION,
    QUOTED_INJECTION,
    TITLE_INJECTION,
    Elements,
    chromium,
    dump_dom,
)

import lens_attn
from lens_attn.cli import main
from lens_attn.render.atlas import DATA_ELEMENT_ID, atlas_files, render_atlas

PLANTED = [
    f"Hello {TITLE_INJECTION} and {IMG_INJECTION} then {QUOTED_INJECTION} again "
    f"{TITLE_INJECTION} &amp; \u202eevil\u202c done.",
    f"A second text with {IMG_INJECTION} inside it, and {TITLE_INJECTION} once more.",
]
SVG_WITH_SCRIPT = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="40" height="20">'
    "<script>document.title='pwned'</script><rect width='40' height='20' fill='red'/></svg>"
)


@pytest.fixture(scope="module")
def bundled():
    return lens_attn.load_model(device="cpu")


@pytest.fixture(scope="module")
def planted_atlas(bundled):
    return lens_attn.atlas(bundled, PLANTED, k=6, per_decile=2, progress=False)


def test_files_carry_corpus_text_only_as_escaped_json(planted_atlas):
    labels = {"L1H5": ["induction", f"<b>{IMG_INJECTION}</b>"]}
    notes = {"L1H5": [f"confirmed {TITLE_INJECTION}"]}
    files = atlas_files(planted_atlas, labels=labels, notes=notes, title=TITLE_INJECTION)
    n_heads = planted_atlas.n_layers * planted_atlas.n_heads
    assert len(files) == 1 + n_heads and "heads/L1H5.js" in files
    page = files["index.html"]
    for text in files.values():
        # no payload survives unescaped: in the JSON "<" is written \u003c
        assert TITLE_INJECTION not in text and IMG_INJECTION not in text
        assert QUOTED_INJECTION not in text and "\u202e" not in text
    assert page.count("<script") == 2  # the JSON data block and the page's own script
    data = json.loads(
        re.search(
            rf'<script type="application/json" id="{DATA_ELEMENT_ID}">(.*?)</script>', page, re.S
        ).group(1)  # fmt: skip
    )
    assert {h["name"] for h in data["heads"]} >= {"L0H0", "L3H7"}
    head = files["heads/L1H5.js"]
    assert head.startswith('lensAtlasHead("L1H5", ') and head.rstrip().endswith(");")
    payload = json.loads(head[len('lensAtlasHead("L1H5", ') : -3])
    assert payload["notes"] == [f"confirmed {TITLE_INJECTION}"]  # the same text, once parsed
    tokens = "".join(t for ex in payload["top"] for t in ex["context"])
    assert "script" in tokens and "onerror" in tokens  # the corpus text is there, as data


def test_csp_allows_only_the_page_script_and_what_it_loads(planted_atlas):
    page = atlas_files(planted_atlas)["index.html"]
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', page).group(1)
    assert "'strict-dynamic'" in csp and "'unsafe-inline'" not in csp.split("style-src")[0]
    assert "default-src 'none'" in csp


def test_cli_atlas_writes_a_run_folder(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in PLANTED) + "\n")
    out = tmp_path / "run"
    assert main(["atlas", "--corpus", str(corpus), "--out", str(out), "--k", "3"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["command"] == "atlas" and run["corpus"] == str(corpus)
    assert "index.html" in run["files"] and "heads/L0H0.js" in run["files"]
    assert (out / "index.html").is_file() and (out / "atlas.csv").is_file()
    assert {"atlas.csv", "atlas.json"} <= set(run["files"])
    loaded = lens_attn.atlases.HeadAtlas.load(out)  # what the run wrote reads back
    assert loaded.top_examples("L1H5", 3)["activation"].is_monotonic_decreasing
    assert main(["atlas", "--corpus", str(corpus), "--out", str(out)]) == 2  # a previous run
    assert "holds a previous run" in capsys.readouterr().err
    assert (
        main(["atlas", "--corpus", str(tmp_path / "none.txt"), "--out", str(tmp_path / "x")]) == 2
    )


@pytest.mark.browser
def test_atlas_page_in_a_browser_shows_heads_and_runs_no_planted_script(
    tmp_path,
    chromium,  # noqa: F811  (the fixture imported from test_report)
    planted_atlas,
):
    labels = {"L1H5": ["induction"]}
    notes = {"L1H5": [f"induction: confirmed {IMG_INJECTION}"]}
    page = render_atlas(planted_atlas, tmp_path / "atlas", labels=labels, notes=notes,
                        title="atlas " + TITLE_INJECTION, circuit_svg=SVG_WITH_SCRIPT)  # fmt: skip
    dom = Elements(dump_dom(chromium, page.as_uri() + "#L1H5", tmp_path / "profile"))
    # nothing set document.title (the harness appends the scatter's SVG <title>s: head names)
    assert dom.text["title"].startswith("atlas " + TITLE_INJECTION + "L0H0")
    dots = [a for tag, a in dom.elements if tag == "circle" and a.get("id", "").startswith("dot-")]
    assert len(dots) == planted_atlas.n_layers * planted_atlas.n_heads  # the scatter is drawn
    assert any("selected" in (a.get("class") or "") for a in dots)
    assert dom.text["head-heading"] == "Head L1H5"
    examples = [a for tag, a in dom.elements if tag == "div" and a.get("class") == "example"]
    assert len(examples) >= 6  # the top examples and the decile samples, loaded from heads/L1H5.js
    shown = dom.text["top-examples"]
    assert "script" in shown and "onerror" in shown  # the planted markup is shown as text
    assert "\u202e" not in shown  # no bidi control reaches the page (escaped, or byte tokens)
    # the only image is the circuit graph slot's SVG (images run no script); the planted <img> is text
    images = dom.tags("img")
    assert len(images) == 1 and images[0]["src"].startswith("data:image/svg+xml;base64,")
    assert len(dom.tags("script")) == 3  # data, app, and the one head file it loaded
    assert IMG_INJECTION in dom.text["head-notes"]


def test_discover_with_a_corpus_puts_the_labels_on_the_atlas_pages(tmp_path, bundled):
    from lens_attn.discover import discover

    run = discover(bundled, tmp_path / "run", corpus=PLANTED, figures=False, progress=False,
                   ablation_budget_s=5, confirm_prompts=8)  # fmt: skip
    files = json.loads((tmp_path / "run" / "run.json").read_text())["files"]
    assert "atlas/index.html" in files and "atlas/heads/L1H5.js" in files
    labelled = next(h for h, labs in sorted(run.labels.labels.items()) if labs)
    name = lens_attn.head_label(*labelled)
    head = (tmp_path / "run" / "atlas" / "heads" / f"{name}.js").read_text()
    payload = json.loads(head[len(f'lensAtlasHead("{name}", ') : -3])
    assert any(run.labels.labels[labelled][0] in line for line in payload["notes"])


def test_head_atlas_save_and_load_round_trip(planted_atlas, tmp_path):
    """Every field of the atlas reads back equal: tables (nested keys included), grids, OV/QK
    tables, PCA, probe patterns and provenance."""
    from lens_attn.atlases import HeadAtlas

    planted_atlas.save(tmp_path / "atlas")
    loaded = HeadAtlas.load(tmp_path / "atlas")
    assert (loaded.n_layers, loaded.n_heads) == (planted_atlas.n_layers, planted_atlas.n_heads)
    pd.testing.assert_frame_equal(loaded.to_dataframe(), planted_atlas.to_dataframe())
    for name in ("L1H5", "L0H0"):
        pd.testing.assert_frame_equal(loaded.top_examples(name), planted_atlas.top_examples(name))
        pd.testing.assert_frame_equal(loaded.decile_examples(name),
                                      planted_atlas.decile_examples(name))  # fmt: skip
    assert loaded.ov == planted_atlas.ov and loaded.qk == planted_atlas.qk
    assert loaded.pca == planted_atlas.pca and loaded.provenance == planted_atlas.provenance
    for a, b in zip(loaded.probes, planted_atlas.probes, strict=True):
        assert a["tokens"] == b["tokens"]
        torch.testing.assert_close(a["pattern"], b["pattern"].float(), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="HeadAtlas"):
        HeadAtlas.load(tmp_path / "missing")
