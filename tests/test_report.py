"""Tests for lens_attn.render.report: compact encoding, escaping, one bundle per file, and a real browser.

The browser test needs Debian's chromium (``apt-get install -y chromium``). It is skipped when
chromium is missing, except under CI (``CI=true``), where a missing browser fails the test.
"""

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
from html.parser import HTMLParser

import pytest
import torch

from lens_attn.patterns import AttentionPatterns
from lens_attn.render import report
from lens_attn.scoring.results import HeadScores

# Single quotes: JSON leaves them alone, so this one runs when CircuitsVis inlines it (see the
# control test at the end); the double-quoted form arrives as document.title=\"pwned\", which is a
# syntax error.
TITLE_INJECTION = "</script><script>document.title='pwned'</script>"
QUOTED_INJECTION = '</script><script>document.title="pwned"</script>'
IMG_INJECTION = "<img src=x onerror=alert(1)>"
TOKENS = [
    "<s>",
    " Hi",
    TITLE_INJECTION,
    " " + IMG_INJECTION,
    QUOTED_INJECTION,
    " &amp;",
    "\u2028",
    " end",
]
TITLE = 'Report <b>"x"</b> & co'


def causal_patterns(tokens=TOKENS, n_layers=3, n_heads=4, layers=None, batch=1, seed=0):
    n = len(tokens)
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n_layers, batch, n_heads, n, n, generator=g)
    future = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    pattern = logits.masked_fill(future, -torch.inf).softmax(dim=-1)
    return AttentionPatterns(
        pattern, layers or list(range(n_layers)), torch.zeros(batch, n, dtype=torch.long),
        torch.ones(batch, n, dtype=torch.bool), [list(tokens)] * batch,
    )  # fmt: skip


def make_scores(n_layers=3, n_heads=4, names=("induction", "previous_token")):
    g = torch.Generator().manual_seed(1)
    values = {name: torch.rand(n_layers, n_heads, generator=g) for name in names}
    values[names[0]][0, 0] = float("nan")
    return HeadScores(values, {k: torch.zeros_like(v) for k, v in values.items()},
                      provenance={"model": IMG_INJECTION})  # fmt: skip


def data_block(page: str) -> dict:
    match = re.search(
        r'<script type="application/json" id="lens-attn-data">(.*?)</script>', page, re.S
    )
    return json.loads(match.group(1))


# --------------------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_encoding_round_trips_within_half_a_quantisation_step(causal):
    g = torch.Generator().manual_seed(0)
    maps = (
        torch.rand(5, 9, 9, generator=g) * torch.tensor([1.0, 0.5, 0.1, 1e-3, 0.0])[:, None, None]
    )
    if causal:
        maps = maps.tril()
    entry = report.encode_layer(maps)
    assert entry["tri"] is causal
    n_entries = 9 * 10 // 2 if causal else 81
    assert len(base64.b64decode(entry["data"])) == 5 * n_entries  # one byte per stored weight
    decoded = report.decode_layer(entry, 9)
    # rounding to the nearest of 255 steps of the head's max is off by at most half a step; the
    # 1e-6 covers float32 arithmetic in scale / 255 * byte
    step = maps.flatten(1).amax(-1).clamp(min=1e-30) / 255
    assert ((decoded - maps).abs().flatten(1).amax(-1) <= step / 2 + 1e-6).all()
    assert (decoded[4] == 0).all()  # an all-zero head stays zero


def test_report_data_keeps_tokens_and_layers_exactly():
    patterns = causal_patterns(layers=[0, 2, 3], batch=2)
    data = report.report_data(patterns, make_scores(n_layers=4))
    assert data["layers"] == [0, 2, 3] and data["n_heads"] == 4
    assert [p["tokens"] for p in data["prompts"]] == [TOKENS, TOKENS]
    assert data["scores"]["values"]["induction"][0][0] is None  # NaN -> null, valid JSON
    with pytest.raises(ValueError, match="4 heads"):
        report.report_data(causal_patterns(n_heads=3), make_scores())


# --------------------------------------------------------------------------------------- the page


def test_page_escapes_every_string_and_embeds_the_bundle_once(tmp_path):
    patterns = causal_patterns(batch=2)
    path = report.render_report(patterns, make_scores(), path=tmp_path / "r.html", title=TITLE)
    page = path.read_text(encoding="utf-8")
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # written atomically, no leftovers
    # CircuitsVis's bundle once (for 3 layers x 2 prompts), and three script elements: the JSON
    # data, the bundle, the app (the bundle itself holds the string "<script><\\/script>")
    bundle = report.circuitsvis_bundle()
    assert page.count(bundle) == 1 and page.count("var CircuitsVis=") == 1
    outside = page.replace(bundle, "")
    assert outside.count("<script") == 3 and len(re.findall(r"</script", page, re.I)) == 3
    # no injected text appears raw anywhere: not in the data block, not as HTML
    assert TITLE_INJECTION not in page and QUOTED_INJECTION not in page
    assert "<img" not in page and "\u2028" not in page
    assert f"<title>{'Report &lt;b&gt;&quot;x&quot;&lt;/b&gt; &amp; co'}</title>" in page
    data = data_block(page)
    assert data["prompts"][0]["tokens"] == TOKENS  # and JSON.parse gives the tokens back unchanged
    assert data["provenance"] == {"model": IMG_INJECTION}
    assert data["scores"]["names"] == ["induction", "previous_token"]


def test_csp_allows_exactly_the_embedded_scripts(tmp_path):
    page = report.render_html(causal_patterns())
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', page).group(1)
    scripts = re.findall(r"<script>(.*?)</script>", page, re.S)
    hashes = {"'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
              for s in scripts}  # fmt: skip
    assert (
        len(scripts) == 2 and set(re.search(r"script-src ([^;]*)", csp).group(1).split()) == hashes
    )
    assert "default-src 'none'" in csp


def test_report_is_a_quarter_of_circuitsvis_render_or_less():
    """The report of every layer against CircuitsVis's attention_heads of each layer, summed."""
    import circuitsvis.attention

    tokens = [f" t{i}" for i in range(64)]
    patterns = causal_patterns(tokens=tokens, n_layers=4, n_heads=8)
    ours = len(report.render_html(patterns).encode())
    theirs = sum(
        len(circuitsvis.attention.attention_heads(patterns.layer(layer), tokens).local_src.encode())
        for layer in patterns.layers
    )
    assert ours <= theirs / 4, (ours, theirs)


def test_padded_prompts_keep_only_their_real_tokens():
    patterns = causal_patterns(batch=2)
    patterns.mask[1, 5:] = False  # the second prompt is 5 tokens long, right-padded
    patterns.pattern[:, 1, :, 5:] = 0.0
    patterns.str_tokens[1] = TOKENS[:5]
    second = report.report_data(patterns)["prompts"][1]
    assert second["n"] == 5 and second["tokens"] == TOKENS[:5]
    decoded = report.decode_layer(second["layers"][2], 5)
    # within half a quantisation step, scale / 510, and every scale (a max weight) is <= 1
    torch.testing.assert_close(decoded, patterns.layer(2, batch=1), atol=1 / 510, rtol=0)


def test_open_head_is_checked_against_the_captured_layers():
    patterns = causal_patterns(layers=[0, 2, 3])
    assert report.report_data(patterns, open_head="L2H3")["open_head"] == [2, 3]
    assert report.report_data(patterns, open_head=(3, 0))["open_head"] == [3, 0]
    with pytest.raises(ValueError, match="not captured"):
        report.report_data(patterns, open_head="L1H0")
    with pytest.raises(ValueError, match="valid heads 0..3"):
        report.report_data(patterns, open_head="L2H4")


def test_render_report_validates_its_path(tmp_path):
    with pytest.raises(ValueError, match=r"\.html"):
        report.render_report(causal_patterns(), path=tmp_path / "report.txt")


# ------------------------------------------------------------------------------ in a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NO_NETWORK = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
    "--proxy-bypass-list=<-loopback>",
]  # fmt: skip


@pytest.fixture
def chromium():
    if CHROMIUM is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(
                "chromium is missing; CI must run the browser tests (apt-get install chromium)"
            )
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return CHROMIUM


def dump_dom(chromium: str, url: str, profile) -> str:
    """The DOM after the page's scripts ran, from headless chromium with the network blocked:
    names resolve nowhere and all traffic goes to a proxy on the discard port, which refuses it."""
    args = [chromium, *NO_NETWORK, f"--user-data-dir={profile}", "--virtual-time-budget=5000"]
    # a session of its own, so a timeout ends chromium's helper processes too
    process = subprocess.Popen(
        [*args, "--dump-dom", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    assert process.returncode == 0, stderr[-2000:]
    return stdout


class Elements(HTMLParser):
    """Collects (tag, attrs) of every element, the title text, and text by element id."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.elements, self.text, self._open = [], {}, []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.elements.append((tag, attrs))
        if tag not in {"img", "br", "meta", "input", "hr", "link"}:
            self._open.append(attrs.get("id") or tag)

    def handle_endtag(self, tag):
        if self._open:
            self._open.pop()

    def handle_data(self, data):
        for key in self._open:
            self.text[key] = self.text.get(key, "") + data

    def tags(self, name):
        return [attrs for tag, attrs in self.elements if tag == name]


@pytest.mark.browser
def test_report_renders_offline_and_runs_no_injected_code(tmp_path, chromium):
    path = report.render_report(
        causal_patterns(), make_scores(), path=tmp_path / "report.html", title=TITLE
    )
    dom = Elements(dump_dom(chromium, path.as_uri() + "#L1H2", tmp_path / "profile"))
    # CircuitsVis rendered its views from the embedded bundle, without the network
    assert (
        "Head Selector (hover to view, click to lock)" in dom.text["layer-view"]
    )  # AttentionHeads
    assert dom.tags("canvas")  # AttentionPattern heatmaps
    assert any("colored-tokens" in (a.get("class") or "") for a in dom.tags("div"))  # ColoredTokens
    assert dom.text["head-heading"] == "Head L1H2"  # the #L1H2 link opened that head
    assert any(
        a.get("id") == "cell-1-2" and "selected" in a.get("class", "") for a in dom.tags("td")
    )
    # the injected prompt is text: it ran nothing and created no element
    assert dom.text["title"] == TITLE
    assert len(dom.tags("script")) == 3 and dom.tags("img") == []
    assert dom.text["prompt-text"] == "".join(TOKENS)
    query_view = dom.text["query-view"].replace("\xa0", " ")  # ColoredTokens shows spaces as &nbsp;
    assert TITLE_INJECTION in query_view and IMG_INJECTION in query_view
    assert dom.text["provenance"].count(IMG_INJECTION) == 1


@pytest.mark.browser
def test_browser_check_catches_circuitsvis_own_injection(tmp_path, chromium):
    """Control for the test above: CircuitsVis's own local render of the same tokens lets the
    injected script run, and this harness sees it."""
    import circuitsvis.attention

    tokens = ["<s>", TITLE_INJECTION, " end"]  # no alert(): a dialog would stall headless chromium
    view = circuitsvis.attention.attention_heads(causal_patterns(tokens).layer(0), tokens)
    page = tmp_path / "circuitsvis.html"
    page.write_text(
        f"<!DOCTYPE html><html><head><title>safe</title></head><body>{view.local_src}</body></html>"
    )
    dom = Elements(dump_dom(chromium, page.as_uri(), tmp_path / "profile"))
    assert dom.text["title"] == "pwned"


def test_report_carries_head_notes_and_the_grid_it_opens_on():
    """discover's labels/verdicts per head and the opening score reach the page as data."""
    patterns = causal_patterns()
    scores = make_scores()
    notes = {"L1H2": ["induction: score 0.90 on repeated_random", "<b>not html</b>"]}
    name = scores.names[-1]
    data = report.report_data(patterns, scores, open_head="L1H2", open_score=name, heads=notes)
    assert data["heads"] == notes and data["open_score"] == name
    page = report.render_html(patterns, scores, open_head="L1H2", open_score=name, heads=notes)
    assert "<b>not html</b>" not in page  # the JSON is escaped; the page sets it as text
    assert 'id="head-notes"' in page
