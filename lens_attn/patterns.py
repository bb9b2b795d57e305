"""Capture the attention pattern of every layer for a few prompts.

    >>> model = lens_attn.load_model()
    >>> patterns = lens_attn.capture_patterns(model, ["The cat sat on the mat. The cat"])
    >>> n = len(patterns.str_tokens[0])
    >>> patterns.head(layer=1, head=3).shape == (n, n)      # [query_pos, key_pos]
    True
    >>> bool(torch.allclose(patterns.head(1, 3).sum(-1), torch.ones(n)))  # rows sum to 1
    True

``run_with_cache`` keeps only ``blocks.<l>.attn.hook_pattern`` (a names filter), so memory holds the
patterns and nothing else. This is for looking at a few prompts; to score many prompts use
``lens_attn.score_heads``, which never holds more than one layer's pattern.
"""

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens.utilities import get_act_name

from lens_attn.heads import parse_head
from lens_attn.probes import Probe, as_probes, check_context, pad, pad_token_id
from lens_attn.probes import str_tokens as probe_str_tokens


@dataclass
class AttentionPatterns:
    """Attention patterns of several layers for a right-padded batch of prompts.

    ``pattern[i]`` belongs to model layer ``layers[i]``. Rows of padded queries are all zero; real rows
    sum to 1 over the real keys at or before the query.
    """

    pattern: Float[Tensor, "layer batch head_index query_pos key_pos"]
    layers: list[int]
    tokens: Int[Tensor, "batch pos"]
    mask: Bool[Tensor, "batch pos"]  # True on real (non-padding) tokens
    str_tokens: list[list[str]]  # per prompt, real tokens only

    @property
    def n_heads(self) -> int:
        return self.pattern.shape[2]

    def parse_head(self, spec: "str | tuple[int, int]", *, what: str = "head") -> tuple[int, int]:
        """``"L1H3"`` or ``(1, 3)`` -> ``(1, 3)``, checked against the heads and captured layers."""
        layer, head = parse_head(spec, max(self.layers) + 1, self.n_heads)
        if layer not in self.layers:
            raise ValueError(
                f"{what} {spec!r}: layer {layer} was not captured; captured layers: {self.layers}"
            )
        return layer, head

    def _layer_index(self, layer: int) -> int:
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not captured; captured layers: {self.layers}")
        return self.layers.index(layer)

    def _length(self, batch: int) -> int:
        if not 0 <= batch < self.tokens.shape[0]:
            raise ValueError(
                f"batch index {batch} out of range; valid: 0..{self.tokens.shape[0] - 1}"
            )
        return int(self.mask[batch].sum())

    def head(self, layer: int, head: int, batch: int = 0) -> Float[Tensor, "query_pos key_pos"]:
        """One head's pattern for prompt ``batch``, trimmed to its real tokens."""
        if not 0 <= head < self.n_heads:
            raise ValueError(f"head {head} out of range; valid: 0..{self.n_heads - 1}")
        n = self._length(batch)
        return self.pattern[self._layer_index(layer), batch, head, :n, :n]

    def layer(self, layer: int, batch: int = 0) -> Float[Tensor, "head_index query_pos key_pos"]:
        """Every head of one layer for prompt ``batch``, trimmed to its real tokens."""
        n = self._length(batch)
        return self.pattern[self._layer_index(layer), batch, :, :n, :n]

    def mean_over_heads(self, layer: int, batch: int = 0) -> Float[Tensor, "query_pos key_pos"]:
        """The head-averaged pattern of one layer for prompt ``batch``."""
        return self.layer(layer, batch).mean(dim=0)

    def to_numpy(self) -> np.ndarray:
        """The full ``[layer, batch, head_index, query_pos, key_pos]`` array as float32 numpy."""
        return self.pattern.detach().float().cpu().numpy()


def _check_layers(model, layers: list[int] | None) -> list[int]:
    n_layers = model.cfg.n_layers
    if layers is None:
        return list(range(n_layers))
    layers = [int(layer) for layer in layers]
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"layer(s) {bad} out of range; this model has layers 0..{n_layers - 1}")
    if not layers:
        raise ValueError(f"layers is empty; give some of 0..{n_layers - 1} or None for all")
    return sorted(set(layers))


@torch.no_grad()
def capture_patterns(
    model, prompts: str | list[str] | list[Probe] | Tensor, *, layers: list[int] | None = None
) -> AttentionPatterns:
    """Run the prompts once and keep ``blocks.<l>.attn.hook_pattern`` for the chosen layers.

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge`` in compatibility mode.
        prompts: a prompt, a list of prompts (tokenized as ``model.to_tokens`` does: BOS first
            unless the model was loaded with ``default_prepend_bos=False``),
            a list of ``Probe``, or a ``[batch, pos]`` token tensor.
        layers: layer indices to keep; ``None`` keeps every layer.

    Prompts of different lengths are right-padded into one batch; each prompt's patterns equal those
    of running it alone, and rows of padded queries are set to zero.
    """
    layers = _check_layers(model, layers)
    probes = as_probes(model, prompts)
    check_context(model, probes)
    tokens, mask = pad(probes, pad_id=pad_token_id(model))
    names = {get_act_name("pattern", layer) for layer in layers}
    _, cache = model.run_with_cache(
        tokens.to(model.cfg.device), names_filter=lambda name: name in names, return_type=None
    )
    stacked = torch.stack(
        [cache[get_act_name("pattern", layer)].detach().float().cpu() for layer in layers]
    )  # [layer, batch, head_index, query_pos, key_pos]
    stacked = stacked * mask[None, :, None, :, None]  # padded query rows count nowhere
    str_tokens = [probe_str_tokens(model, p.tokens) for p in probes]
    return AttentionPatterns(stacked, layers, tokens, mask, str_tokens)
