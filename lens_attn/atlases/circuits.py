"""What a head writes (OV) and what attracts it (QK), read from the weights for chosen tokens.

Effective embedding. A token's vector as layer 1 onwards sees it: the residual stream after layer 0
on the one-token input, ``lens_attn.scoring.ov_circuit.effective_embedding`` (the same definition
the copying and copy-suppression labels read; McDougall et al. 2023, Gould et al. 2023).

OV. For a source token ``t`` a head attends to, its write is ``ln1(e_t) W_V W_O`` (``ln1`` of the
head's layer, ``W_V`` of its key/value head under GQA); through the final norm and the unembedding,
``ln_final(write) W_U``, its top logits are the tokens the head pushes up when it attends to ``t``.

QK. For a query token ``a`` and a key token ``b``, ``(ln1(e_a) W_Q) . (ln1(e_b) W_K) / sqrt(d_head)``:
the attention score at relative distance 0, where rotary embeddings cancel (the head's positional
preference is in its corpus metrics instead). Pairs are scored among the query tokens of the head's
top examples and the key tokens they attend to, and the highest are listed.
"""

import torch
from jaxtyping import Float, Int
from torch import Tensor


def _per_query_head(model, weights: Tensor) -> Tensor:
    """``[kv_head, ...]`` weights repeated for every query head reading them (GQA)."""
    n_heads = model.cfg.n_heads
    if weights.shape[0] == n_heads:
        return weights
    return weights.repeat_interleave(n_heads // weights.shape[0], dim=0)


@torch.no_grad()
def ov_top_tokens(
    model, layer: int, head: int, sources: Float[Tensor, "n d_model"], *, top: int = 5
) -> tuple[Float[Tensor, "n top"], Int[Tensor, "n top"]]:
    """Per source token (its effective embedding, a row of ``sources``), the ``top`` logits and
    token ids of the head's OV write through the final norm and ``W_U``."""
    w_v = _per_query_head(model, model.W_V[layer])[head]
    write = model.blocks[layer].ln1(sources[None]) @ w_v @ model.W_O[layer, head]  # [1, n, d_model]
    logits = model.ln_final(write)[0] @ model.W_U
    values, ids = torch.topk(logits.float(), min(top, logits.shape[-1]), dim=-1)
    return values.cpu(), ids.cpu()


@torch.no_grad()
def qk_scores(
    model,
    layer: int,
    head: int,
    queries: Float[Tensor, "n_query d_model"],
    keys: Float[Tensor, "n_key d_model"],
) -> Float[Tensor, "n_query n_key"]:
    """The head's attention score for every (query, key) pair of effective embeddings, at
    relative distance 0."""
    ln1 = model.blocks[layer].ln1
    w_q = _per_query_head(model, model.W_Q[layer])[head]
    w_k = _per_query_head(model, model.W_K[layer])[head]
    q = ln1(queries[None])[0] @ w_q
    k = ln1(keys[None])[0] @ w_k
    return (q @ k.T / q.shape[-1] ** 0.5).float().cpu()
