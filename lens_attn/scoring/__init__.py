"""Stage 2: score every head. The protocol, the registry, the built-in formulas, the streaming runner.

``protocol`` (``Analysis``, ``PromptRatio``, ``Batch``) · ``registry`` (``register_analysis``) ·
``builtin`` (the formulas) · ``runner`` (``score_heads``) · ``chunked`` (bounded-memory patterns for
long prompts) · ``results`` (``HeadScores``, ``HeadLabels``).
"""

from lens_attn.scoring import builtin as _builtin  # noqa: F401  (registers the built-in scores)
