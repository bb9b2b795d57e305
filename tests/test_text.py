"""Issue case 9: bidirectional control characters are shown escaped (``\\u202e``), never raw, in
the report, the terminal heatmaps and the figure labels."""

import pytest
import torch

from lens_attn.patterns import AttentionPatterns
from lens_attn.render.figures import token_label
from lens_attn.render.report import render_html
from lens_attn.render.terminal import text_heatmap
from lens_attn.text import BIDI_CONTROLS, escape_bidi

CONTROLS = list(BIDI_CONTROLS)


@pytest.mark.parametrize("char", CONTROLS, ids=[f"U+{ord(c):04X}" for c in CONTROLS])
def test_escape_bidi_writes_each_control_visibly(char):
    assert escape_bidi(f"a{char}b") == f"a\\u{ord(char):04x}b"


def test_escape_bidi_leaves_other_text_alone():
    text = "naïve café — 東京 \u05e9\u05dc\u05d5\u05dd"  # Hebrew letters are not controls
    assert escape_bidi(text) == text
    # U+202A..U+202E, U+2066..U+2069, U+200E/U+200F, U+061C: exactly the twelve of the issue
    expected = [*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C]
    assert sorted(map(ord, BIDI_CONTROLS)) == sorted(expected)


def _patterns(str_tokens: list[str]) -> AttentionPatterns:
    n = len(str_tokens)
    pattern = torch.tril(torch.ones(n, n))
    pattern = (pattern / pattern.sum(-1, keepdim=True))[None, None, None].expand(1, 1, 2, n, n)
    return AttentionPatterns(
        pattern.contiguous(), [0], torch.arange(n)[None], torch.ones(1, n, dtype=torch.bool),
        [str_tokens],
    )  # fmt: skip


def test_report_and_terminal_show_bidi_controls_escaped():
    tokens = ["<s>", "pay ", "\u202eevil", "\u2066x\u2069", " \u200f"]
    page = render_html(_patterns(tokens), title="lens-attn: \u202eevil")
    assert not any(c in page for c in BIDI_CONTROLS)
    assert "\\\\u202eevil" in page  # the JSON payload holds the visible escape \u202e
    assert "lens-attn: \\u202eevil" in page  # the title
    heatmap = text_heatmap(torch.tril(torch.ones(5, 5)) / 5, tokens, title="t")
    assert not any(c in heatmap for c in BIDI_CONTROLS) and "\\u202e" in heatmap
    assert token_label("\u202eevil") == "\\u202eevil"
