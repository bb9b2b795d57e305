"""Head scores read from a head's OV circuit on the effective embedding: copying, copy suppression,
succession.

    >>> from lens_attn.scoring.ov_circuit import effective_embedding
    >>> effective_embedding(model, torch.tensor([5, 6, 7])).shape      # [token, d_model]
    torch.Size([3, 128])

**The effective embedding** of a token is the residual stream after layer 0 on the one-token input
``[token]`` (no BOS: layer 0's attention sees the token alone, and its MLP has run). A head in a later
layer reads tokens through it, not through the raw ``W_E``; McDougall et al. 2023, "Copy
Suppression: Comprehensively Understanding an Attention Head", section 3 (the "effective
embedding"), and Gould et al. 2023 (the same for successor heads). ``effective_embedding`` runs
block 0 only, once per call, on a seeded sample of the vocabulary.

**A head's OV row** for token ``t`` is ``ln_final(ln1(e_t) W_V W_O) W_U``: what the head writes into
the logits when it attends to ``t`` with all its weight (``ln1`` its layer's input RMSNorm,
``ln_final`` the final one, whose per-row scaling leaves ranks unchanged). Scores:

- ``copy_rank``: the share of sampled tokens whose own logit is among the top ``k = 10`` of its OV
  row (McDougall et al. 2023's copying test; Wang et al. 2022, "Interpretability in the Wild",
  name movers' copy score: the attended token among the top logits). Label ``copying``.
- ``suppress_rank``: the share whose own logit is among the bottom ``k`` (McDougall et al. 2023:
  a copy-suppression head's OV circuit puts the attended token among the most suppressed). Label
  ``copy_suppression``.
- ``successor``: Gould et al. 2023, "Successor Heads: Recurring, Interpretable Attention Heads in
  the Wild", the succession score: for each member of an ordinal sequence the tokenizer has as
  single tokens (``lens_attn.probes.ORDINAL_WORDS``: numbers 1-20, one-ten, days, months, letters;
  with and without a leading space, capitalised or not), the OV row restricted to that sequence's tokens; a hit when the successor
  has the largest logit. The score is the share of hits. Label ``successor``.

Cost. The exact rank over a vocabulary of ``V`` needs ``[n_tokens, V]`` logits per head
(SmolLM2: 270 heads x 49,152 words, ~6 TFLOP for 400 tokens). Above ``EXACT_VOCAB`` words, each
token's rank is taken among a seeded random ``1/k`` of the vocabulary instead, and a hit is rank 1
there: a token at true rank ``r`` is then a hit with probability ``(1 - 1/k)^r``, which sums to
``k`` over ranks, so the expected share is the top-``k`` share smoothed over neighbouring ranks.
Each head's rows are ``(e W_V) (W_O W_U[:, sample])`` (rank ``d_head``). SmolLM2: 256 tokens
against 4,915 words, ~0.15 TFLOP (about 2 s at the 85 GFLOP/s scoring reaches on one idle thread). ``successor`` needs only the ordinal
tokens' logits.
"""

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.utilities import get_act_name

from lens_attn import compat
from lens_attn.probes import ordinal_sequences
from lens_attn.scoring.protocol import Analysis
from lens_attn.scoring.registry import register_analysis

TOP_K = 10  # "among the top 10 logits" (McDougall et al. 2023)
N_TOKENS = 256  # sampled tokens whose OV rows are ranked
EXACT_VOCAB = 8192  # at or below this vocabulary size the rank is exact
SEED = 0


@torch.no_grad()
def effective_embedding(model, tokens: Int[Tensor, " token"]) -> Float[Tensor, "token d_model"]:
    """The residual stream after layer 0 on each token alone (no BOS); see the module docstring."""
    name = get_act_name("resid_post", 0)
    captured: list[Tensor] = []

    def capture(activation, hook):
        captured.append(activation[:, 0].detach().clone())
        raise compat.StopForward  # nothing after layer 0 is read

    compat.run_until_stopped(model, tokens.to(model.cfg.device)[:, None], [(name, capture)])
    return captured[0].float()


class OVWeights:
    """Every layer's ``W_V`` (per query head), ``W_O`` and the unembedding, read once: the stacked
    weight properties rebuild every layer on each access (``model.W_V`` repeats GQA heads)."""

    def __init__(self, model):
        n_heads = model.cfg.n_heads
        self.model = model
        w_v = model.W_V.float()  # [layer, head, d_model, d_head]; the bridge's per kv head
        if w_v.shape[1] != n_heads:
            w_v = w_v.repeat_interleave(n_heads // w_v.shape[1], dim=1)
        self.w_v, self.w_o = w_v, model.W_O.float()  # W_O: [layer, head, d_head, d_model]
        self.w_u = model.W_U.float()  # [d_model, d_vocab]
        weight = _final_norm_weight(model)
        if weight is not None:  # not folded into W_U (the bridge)
            self.w_u = weight[:, None] * self.w_u

    @torch.no_grad()
    def logits(
        self, layer: int, resid: Float[Tensor, "token d_model"], vocab: Tensor | None = None
    ) -> Float[Tensor, "head_index token word"]:
        """Every head of ``layer``'s OV row on ``resid``, unembedded on ``vocab`` (``None``: all).

        ``ln_final``'s RMS scaling multiplies each row by one positive number, which changes no
        rank within a row: it is left out. The product goes through ``W_O W_U`` (rank d_head)."""
        dev = self.w_u.device
        x = self.model.blocks[layer].ln1(resid.to(dev)).float()
        values = torch.einsum("td,hde->hte", x, self.w_v[layer].to(dev))  # [head, token, d_head]
        w_u = self.w_u if vocab is None else self.w_u[:, vocab.to(dev)]
        return values @ (self.w_o[layer].to(dev) @ w_u)


def ov_logits(
    model, layer: int, resid: Float[Tensor, "token d_model"], vocab: Tensor | None = None
) -> Float[Tensor, "head_index token word"]:
    """Every head of ``layer``'s OV row on ``resid``, unembedded on ``vocab`` (``None``: all).
    For many layers build one ``OVWeights(model)`` and call its ``logits``."""
    return OVWeights(model).logits(layer, resid, vocab)


def _final_norm_weight(model) -> Tensor | None:
    """``ln_final``'s weight where it was not folded into ``W_U`` (the bridge), else None."""
    weight = getattr(model.ln_final, "w", None)
    if weight is None:
        weight = getattr(getattr(model.ln_final, "original_component", None), "weight", None)
    return None if weight is None else weight.float().to(model.W_U.device)


def sample_tokens(model, n: int, *, seed: int = SEED) -> Int[Tensor, " token"]:
    """``n`` distinct seeded random ids that are not special tokens (``probes._random_ids``)."""
    from lens_attn.probes import _random_ids

    pool = _random_ids(model)
    g = torch.Generator().manual_seed(seed)
    return pool[torch.randperm(len(pool), generator=g)[: min(n, len(pool))]]


class OVRank(Analysis):
    """``copy_rank`` and ``suppress_rank``: the share of sampled tokens whose own logit is among
    the top / bottom ``TOP_K`` of the head's OV row (module docstring, with its sources).

    Computed from the weights; the stderr is the binomial one over the sampled tokens."""

    name = "ov_rank"
    outputs = ("copy_rank", "suppress_rank")
    hooks = ()

    def __init__(self, n_tokens: int = N_TOKENS, k: int = TOP_K, seed: int = SEED):
        self.n_tokens, self.k, self.seed = n_tokens, k, seed

    @torch.no_grad()
    def from_weights(self, model):
        tokens = sample_tokens(model, self.n_tokens, seed=self.seed)
        d_vocab = model.cfg.d_vocab
        if d_vocab <= EXACT_VOCAB:
            vocab, k = None, self.k
            own = tokens
        else:  # the rank among a random 1/k of the vocabulary; hit = rank 1 (module docstring)
            g = torch.Generator().manual_seed(self.seed + 1)
            others = torch.randperm(d_vocab, generator=g)[: d_vocab // self.k]
            others = others[~torch.isin(others, tokens)]
            vocab = torch.cat([tokens, others])
            own, k = torch.arange(len(tokens)), 1
        resid = effective_embedding(model, tokens)
        weights = OVWeights(model)
        copy, suppress = [], []
        rows = torch.arange(len(tokens))
        for layer in range(model.cfg.n_layers):
            logits = weights.logits(layer, resid, vocab).cpu()  # [head, token, word]
            mine = logits[:, rows, own]  # [head, token]
            if vocab is not None:  # each token against the sampled words alone
                logits = logits[:, :, len(tokens) :]
            top, bottom = _kth_extremes(logits, k)
            # fewer than k words above (below) the token's own logit <=> the k-th largest
            # (smallest) word is not above (below) it
            copy.append((top <= mine).float().mean(-1))
            suppress.append((bottom >= mine).float().mean(-1))
        out = {}
        for name, grid in (
            ("copy_rank", torch.stack(copy)),
            ("suppress_rank", torch.stack(suppress)),
        ):
            out[name] = (grid, (grid * (1 - grid) / len(tokens)).sqrt())
        return out


def _kth_extremes(
    logits: Float[Tensor, "head_index token word"], k: int
) -> tuple[Float[Tensor, "head_index token"], Float[Tensor, "head_index token"]]:
    """The ``k``-th largest and ``k``-th smallest logit of each row (one ``aminmax`` pass for
    ``k = 1``; about 10x faster than counting the words above and below on the CPU)."""
    if k == 1:
        bottom, top = logits.aminmax(dim=-1)
        return top, bottom
    if k > logits.shape[-1]:  # fewer words than k: every token is within both
        inf = torch.full(logits.shape[:-1], float("inf"))
        return -inf, inf
    top = logits.topk(k, dim=-1).values[..., -1]
    bottom = logits.topk(k, dim=-1, largest=False).values[..., -1]
    return top, bottom


class Successor(Analysis):
    """Gould et al. 2023's succession score (module docstring): share of ordinal tokens whose
    head's OV row ranks the successor first among its sequence. NaN without a tokenizer or any
    ordinal sequence of one-token words; stderr binomial over the ordinal tokens."""

    name = "successor"
    hooks = ()

    @torch.no_grad()
    def from_weights(self, model):
        shape = (model.cfg.n_layers, model.cfg.n_heads)
        tokenizer = getattr(model, "tokenizer", None)
        sequences = ordinal_sequences(tokenizer) if tokenizer is not None else []
        # a tokenizer larger than the model's vocabulary (toy models): its ids past d_vocab out
        sequences = [s for s in sequences if max(s) < model.cfg.d_vocab]
        if not sequences:
            nan = torch.full(shape, float("nan"))
            return {"successor": (nan, nan.clone())}
        members = torch.tensor([t for s in sequences for t in s[:-1]])
        words = torch.tensor(sorted({t for s in sequences for t in s}))
        column = {int(w): i for i, w in enumerate(words)}
        resid = effective_embedding(model, members)
        weights = OVWeights(model)
        hits = torch.zeros(shape)
        for layer in range(model.cfg.n_layers):
            logits = weights.logits(layer, resid, words).cpu()  # [head, member, word]
            start = 0
            for seq in sequences:  # each member's row on its own sequence's words
                cols = torch.tensor([column[t] for t in seq])
                part = logits[:, start : start + len(seq) - 1][:, :, cols]
                start += len(seq) - 1
                hits[layer] += (part.argmax(-1) == torch.arange(1, len(seq))).sum(-1)
        share = hits / len(members)
        return {"successor": (share, (share * (1 - share) / len(members)).sqrt())}


register_analysis(OVRank())
register_analysis(Successor())
