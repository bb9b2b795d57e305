"""Stage 3: knock heads out and measure what breaks.

``methods`` (``ablate``, ``Ablation``, the methods) · ``result`` (``AblationResult``) · ``inputs``
(prompts ready for a metric) · ``sweep`` (``ablation_sweep``: many ablations per pass) · ``replay``
(the unhooked fast path of the sweep) · ``metrics`` · ``patching`` (activation patching per position) · ``attribution`` (gradient
estimates, for screening) · ``confirm`` (tests of the labels).
"""
