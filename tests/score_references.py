"""Straightforward reference implementations of every built-in score: one score at a time, each
with its own masks, casts and reductions, as ``lens_attn/scoring/builtin.py`` computed them before
the scores were fused into one pass per layer (issue #15). Kept verbatim so the fused pass can be
checked against them head by head (``tests/test_score_references.py``).

Each reference is an ``Analysis`` named ``ref_<score>``; it runs through ``score_heads``'s generic
(unfused) path, so the comparison also covers padded batches and ``query_chunk``.
"""

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from lens_attn.scoring.protocol import Analysis, Batch, PromptRatio, RatioAnalysis

SPARSITY_THRESHOLD = 0.01

# --------------------------------------------------------------------------- masks, per analysis call
# (these keys carry a "ref" prefix so they never share a cache entry with the fused pass)


def _cached(batch: Batch, key, build):
    key = ("ref", *key)
    if key not in batch.scratch:
        batch.scratch[key] = build()
    return batch.scratch[key]


def _query_positions(batch: Batch, p: Tensor) -> Tensor:
    rows = batch.query_rows(p.shape[-2])
    return torch.arange(rows.start, rows.stop, device=p.device)


def _choice_rows(batch: Batch, p: Tensor) -> Bool[Tensor, "batch rows"]:
    def build():
        rows = batch.mask.clone()
        rows[:, 0] = False
        return rows.to(p.device)

    return _cached(batch, ("choice_rows", p.device), build)[:, batch.query_rows(p.shape[-2])]


def _duplicate_mask(batch: Batch, p: Tensor) -> Bool[Tensor, "batch rows key_pos"]:
    def build():
        t, m = batch.tokens, batch.mask
        same = t[:, :, None] == t[:, None, :]
        earlier = torch.ones(t.shape[1], t.shape[1], dtype=torch.bool, device=t.device).tril(-1)
        return (same & earlier & m[:, :, None] & m[:, None, :]).to(p.device)

    return _cached(batch, ("duplicate", p.device), build)[:, batch.query_rows(p.shape[-2])]


def _induction_mask(batch: Batch, p: Tensor) -> Bool[Tensor, "batch rows key_pos"]:
    return torch.nn.functional.pad(_duplicate_mask(batch, p)[:, :, :-1], (1, 0))


def _rows_for(batch: Batch, p: Tensor, target_rows: Tensor) -> Float[Tensor, "batch rows"]:
    if batch.normalize == "all_rows":
        return batch.mask.to(p.device)[:, batch.query_rows(p.shape[-2])].float()
    return (target_rows & _choice_rows(batch, p)).float()


def _ratio(mass: Float[Tensor, "batch head_index rows"], rows: Tensor) -> PromptRatio:
    return PromptRatio((mass * rows[:, None]).sum(-1), rows.sum(-1)[:, None])


def _at_offset(p: Tensor, batch: Batch, offset: int) -> Float[Tensor, "batch head_index rows"]:
    keys = _query_positions(batch, p) - offset
    index = keys.clamp_min(0)[None, None, :, None].expand(*p.shape[:-1], 1)
    return p.gather(-1, index)[..., 0].float() * (keys >= 0)


def _row_statistic(batch: Batch, p: Tensor, per_row: Tensor) -> PromptRatio:
    return _ratio(per_row, _choice_rows(batch, p).float())


# ------------------------------------------------------------------------------------ the formulas


def previous_token(layer, acts, batch):
    p = acts["pattern"]
    return _ratio(_at_offset(p, batch, 1), _rows_for(batch, p, _choice_rows(batch, p)))


def current_token(layer, acts, batch):
    p = acts["pattern"]
    return _ratio(_at_offset(p, batch, 0), _rows_for(batch, p, _choice_rows(batch, p)))


def duplicate_token(layer, acts, batch):
    p = acts["pattern"]
    target = _duplicate_mask(batch, p)
    mass = torch.einsum("bhqk,bqk->bhq", p.float(), target.float())
    return _ratio(mass, _rows_for(batch, p, target.any(-1)))


def induction(layer, acts, batch):
    p = acts["pattern"]
    target = _induction_mask(batch, p)
    mass = torch.einsum("bhqk,bqk->bhq", p.float(), target.float())
    return _ratio(mass, _rows_for(batch, p, target.any(-1)))


def bos(layer, acts, batch):
    p = acts["pattern"]
    return _ratio(p[..., 0].float(), _rows_for(batch, p, _choice_rows(batch, p)))


def entropy(layer, acts, batch):
    p = acts["pattern"].float()
    visible = (_query_positions(batch, p) + 1).to(p.dtype)
    h = -torch.special.xlogy(p, p).sum(-1) / torch.log(visible).clamp_min(1e-30)
    return _row_statistic(batch, p, h)


def confidence(layer, acts, batch):
    p = acts["pattern"]
    return _row_statistic(batch, p, p.amax(-1).float())


def mean_distance(layer, acts, batch):
    p = acts["pattern"].float()
    keys = torch.arange(p.shape[-1], device=p.device, dtype=p.dtype)
    distance = (_query_positions(batch, p)[:, None] - keys[None, :]).clamp_min(0)
    return _row_statistic(batch, p, torch.einsum("bhqk,qk->bhq", p, distance))


def sparsity(layer, acts, batch):
    p = acts["pattern"]
    queries = _query_positions(batch, p)
    visible = torch.arange(p.shape[-1], device=p.device)[None, :] <= queries[:, None]
    below = ((p < SPARSITY_THRESHOLD) & visible).sum(-1).float()
    return _row_statistic(batch, p, below / (queries + 1))


class DominantOffset(Analysis):
    name = "ref_offset"
    outputs = ("ref_offset", "ref_offset_share")
    hooks = ("pattern",)
    chunkable = True

    def reduce(self, layer, acts, batch):
        p = acts["pattern"]
        offsets = _query_positions(batch, p)[None, None, :] - p.argmax(-1)
        rows = _choice_rows(batch, p)[:, None, :].expand_as(offsets)
        counts = torch.zeros(p.shape[1], batch.model.cfg.n_ctx, device=p.device)
        head = torch.arange(p.shape[1], device=p.device)[None, :, None].expand_as(offsets)
        counts.index_put_(
            (head[rows], offsets[rows]), torch.ones((), device=p.device), accumulate=True
        )
        return {"offset_counts": counts}

    def finalize(self, state):
        counts = state["offset_counts"]
        best, offset = counts.max(-1)
        share = best / counts.sum(-1).clamp_min(1)
        nan = torch.full_like(share, float("nan"))
        return {
            "ref_offset": (offset.float(), nan),
            "ref_offset_share": (share.float(), nan.clone()),
        }


class Copying(Analysis):
    name = "ref_copying"
    hooks = ()

    @torch.no_grad()
    def from_weights(self, model):
        out = []
        for layer in range(model.cfg.n_layers):
            w_v, w_o = model.W_V[layer].float(), model.W_O[layer].float()
            if w_v.shape[0] != w_o.shape[0]:  # TransformerBridge: one W_V per key/value head
                w_v = w_v.repeat_interleave(w_o.shape[0] // w_v.shape[0], dim=0)
            dev = w_v.device
            ue = model.W_U.float().to(dev) @ model.W_E.float().to(dev)  # once per layer
            circuit = w_o @ ue @ w_v
            lam = torch.linalg.eigvals(circuit.double().cpu())
            out.append((lam.sum(-1).real / lam.abs().sum(-1).clamp_min(1e-30)).float())
        value = torch.stack(out)
        return {"ref_copying": (value, torch.full_like(value, float("nan")))}


RATIO_FORMULAS = {
    "previous_token": previous_token,
    "current_token": current_token,
    "duplicate_token": duplicate_token,
    "induction": induction,
    "bos": bos,
    "entropy": entropy,
    "confidence": confidence,
    "mean_distance": mean_distance,
    "sparsity": sparsity,
}


def reference_analyses() -> list[Analysis]:
    """Fresh, unregistered reference analyses for every built-in score (names ``ref_<score>``)."""
    ratios = [
        RatioAnalysis(f"ref_{name}", fn, ("pattern",), chunkable=True)
        for name, fn in RATIO_FORMULAS.items()
    ]
    return [*ratios, DominantOffset(), Copying()]
