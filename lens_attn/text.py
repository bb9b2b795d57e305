"""Making untrusted text safe to display: bidirectional control characters shown escaped.

A prompt (or a token) holding U+202E RIGHT-TO-LEFT OVERRIDE and its relatives would reorder what a
terminal or a browser displays after it, so what the report shows would not be what the model read.
:func:`escape_bidi` replaces each such character by its visible escape (``\\u202e``); the report,
the terminal heatmaps and the figure labels all show tokens through it.
"""

BIDI_CONTROLS = (
    "\u202a\u202b\u202c\u202d\u202e"  # LRE, RLE, PDF, LRO, RLO (embeddings and overrides)
    "\u2066\u2067\u2068\u2069"  # LRI, RLI, FSI, PDI (isolates)
    "\u200e\u200f"  # LRM, RLM (marks)
    "\u061c"  # ALM (Arabic letter mark)
)
_ESCAPES = {ord(c): f"\\u{ord(c):04x}" for c in BIDI_CONTROLS}


def escape_bidi(text: str) -> str:
    """``text`` with every bidirectional control character written as ``\\uXXXX``, visibly."""
    return text.translate(_ESCAPES)
