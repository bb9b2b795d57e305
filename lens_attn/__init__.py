"""lens-attn: find, label, test and draw the attention heads of Llama 2 family models.

lens-attn wraps a TransformerLens ``HookedTransformer`` (TransformerLens 3.9) or a ``TransformerBridge``
in compatibility mode (3.9 and 4.x; ``lens_attn.compat``) loaded from Llama 2 weights, reads ``blocks.<l>.attn.hook_pattern`` of every layer, scores and
classifies every head, tests the labels with ablations, and renders the patterns.

Vocabulary (TransformerLens's own, used everywhere in this package):

``layer``        index of a transformer block, ``0 .. n_layers - 1``.
``head_index``   index of a *query* head inside a layer, ``0 .. n_heads - 1``. Shortened to ``head``
                 in table columns. Heads are labelled ``"L{layer}H{head}"``, e.g. ``"L3H5"``.
``kv_head``      index of a key/value head under grouped-query attention (GQA); query head ``h``
                 reads key/value head ``h // (n_heads // n_key_value_heads)``.
``batch``        index of a prompt in a batch.
``query_pos``    position that attends (the destination); rows of a pattern.
``key_pos``      position attended to (the source); columns of a pattern.
``d_head``       size of one head's query/key/value vectors.
``pattern``      softmax attention weights, ``[batch, head_index, query_pos, key_pos]`` per layer:
                 each real query row sums to 1 over the real keys at or before it.
hook names       come from ``transformer_lens.utilities.get_act_name``, e.g. ``get_act_name("pattern", 3)``
                 is ``"blocks.3.attn.hook_pattern"``.

Heavy modules (matplotlib, circuitsvis, transformers) are imported only when used, so
``import lens_attn`` stays fast.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it; resolved on first use (PEP 562)
_EXPORTS = {
    "load_model": "loading",
    "BUNDLED_CHECKPOINT": "loading",
    "capture_patterns": "patterns",
    "AttentionPatterns": "patterns",
    "Probe": "probes",
    "builtin_probes": "probes",
    "induction_probes": "probes",
    "score_heads": "scoring.runner",
    "HeadScores": "scoring.results",
    "Analysis": "scoring.protocol",
    "register_analysis": "scoring.registry",
    "DetectionPattern": "scoring.protocol",
    "ablate": "ablation.methods",
    "ablation_sweep": "ablation.sweep",
    "patch_heads_by_pos": "ablation.patching",
    "PatchingResult": "ablation.patching",
    "AblationResult": "ablation.result",
    "attribution_patching": "ablation.attribution",
    "confirm": "ablation.confirm",
    "ConfirmResult": "ablation.confirm",
    "Ablation": "ablation.methods",
    "rank_correlation": "ablation.attribution",
    "render_report": "render.report",
    "plot_pattern": "render.figures",
    "plot_head": "render.figures",
    "plot_layer": "render.figures",
    "plot_head_across_layers": "render.figures",
    "plot_mean_over_heads": "render.figures",
    "plot_rollout": "render.figures",
    "attention_rollout": "render.figures",
    "plot_query_attention": "render.figures",
    "plot_head_grid": "render.grids",
    "plot_scores": "render.grids",
    "plot_ablation": "render.grids",
    "save_figure": "render.figures",
    "text_heatmap": "render.terminal",
    "score_table": "render.terminal",
    "heads_of_layer": "render.notebook",
    "chosen_heads": "render.notebook",
    "top_heads": "render.notebook",
    "head_label": "heads",
    "atlas": "atlases.runner",
    "HeadAtlas": "atlases.result",
    "circuit_graph": "render.notebook",
    "circuit_svg": "render.circuit_graph",
    "circuit": "circuits",
    "CircuitResult": "circuits",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"lens_attn.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'lens_attn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
