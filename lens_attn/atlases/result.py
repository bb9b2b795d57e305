"""``HeadAtlas``: the atlas of every head, built by ``lens_attn.atlas`` (``lens_attn.atlases.runner``).

    head_atlas.top_examples("L1H5", 3)          # the 3 highest activations of L1H5 in the corpus
    head_atlas.to_dataframe()                   # one row per head: its corpus metrics
    head_atlas.decile_examples((1, 5))          # samples from each activation decile
    head_atlas.save("runs/atlas"); HeadAtlas.load("runs/atlas")   # atlas.csv, atlas.json

Columns of ``to_dataframe()``: ``layer``, ``head``, ``name`` (``"L1H5"``), ``n_positions`` (query
positions recorded), ``activation`` (mean ``||z W_O||``), ``top_activation``, ``p10``, ``p50``,
``p90`` (estimated activation deciles), ``distance``, ``entropy``, ``bos``, ``previous``, ``self``,
``duplicate``, ``induction`` (see ``lens_attn.atlases.accumulators``: METRICS and TARGETS).

An example (``top_examples`` / ``decile_examples`` rows): ``doc`` (index of the text in input order),
``query_pos`` (position in ``model.to_tokens(text)``, BOS included where the model prepends it),
``activation``, ``query_token``, ``context`` (token strings around the query, the query at
``context_query``), ``keys`` (the most attended keys: ``key_pos`` in the text, ``-1`` for a window's
added BOS; ``offset`` from the query; ``token``; ``weight``).
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from lens_attn.atlases.accumulators import METRICS, TARGETS
from lens_attn.files import dumps_strict, load_json, nan_for_null, write_text_atomic
from lens_attn.heads import head_label, parse_head

DECILE_QS = tuple(i / 10 for i in range(1, 10))


@dataclass
class HeadAtlas:
    """Per head: top examples, decile samples, corpus metrics, OV and QK tables, PCA, probe patterns."""

    n_layers: int
    n_heads: int
    metrics: dict[str, Tensor]  # name -> [layer, head_index]
    decile_edges: Tensor  # [layer, head_index, 9]
    examples: pd.DataFrame  # every head's top examples: layer, head, rank, + example columns
    deciles: pd.DataFrame  # every head's decile samples: layer, head, decile, + example columns
    ov: dict[str, list[dict]] = field(default_factory=dict)  # "L1H5" -> [{source, weight, top}]
    qk: dict[str, list[dict]] = field(default_factory=dict)  # "L1H5" -> [{query, key, score}]
    pca: dict[str, dict] = field(default_factory=dict)  # "L1H5" -> {coords, activation, explained}
    probes: list[dict] = field(default_factory=list)  # [{name, tokens, pattern [L, H, T, T]}]
    provenance: dict = field(default_factory=dict)

    def _head(self, head) -> tuple[int, int]:
        return parse_head(head, self.n_layers, self.n_heads)

    def top_examples(self, head, k: int | None = None) -> pd.DataFrame:
        """The head's ``k`` highest-activation examples (all kept ones for ``None``), highest first."""
        layer, index = self._head(head)
        table = self.examples
        rows = table[(table["layer"] == layer) & (table["head"] == index)].sort_values("rank")
        rows = rows.head(k) if k is not None else rows
        return rows.drop(columns=["layer", "head", "rank"]).reset_index(drop=True)

    def decile_examples(self, head) -> pd.DataFrame:
        """The head's decile samples (column ``decile``: 0 = lowest tenth .. 9 = highest)."""
        layer, index = self._head(head)
        table = self.deciles
        rows = table[(table["layer"] == layer) & (table["head"] == index)]
        return rows.drop(columns=["layer", "head"]).reset_index(drop=True)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per head with its metrics (see the module docstring for the columns)."""
        rows = []
        top = self.examples[self.examples["rank"] == 0].set_index(["layer", "head"])["activation"]
        for layer in range(self.n_layers):
            for head in range(self.n_heads):
                row = {"layer": layer, "head": head, "name": head_label(layer, head)}
                row["n_positions"] = int(self.metrics["count"][layer, head])
                row["activation"] = float(self.metrics["activation"][layer, head])
                row["top_activation"] = float(top.get((layer, head), float("nan")))
                for q, name in ((0, "p10"), (4, "p50"), (8, "p90")):
                    row[name] = float(self.decile_edges[layer, head, q])
                for name in (*METRICS, *TARGETS):
                    row[name] = float(self.metrics[name][layer, head])
                rows.append(row)
        return pd.DataFrame(rows)

    def files(self) -> dict[str, str]:
        """``{"atlas.csv": to_dataframe(), "atlas.json": everything}``: the text of each file
        ``save`` writes (a run folder writes them through itself)."""
        payload = {
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "metrics": {k: v.tolist() for k, v in self.metrics.items()},
            "decile_edges": self.decile_edges.tolist(),
            "examples": _records(self.examples),
            "deciles": _records(self.deciles),
            "ov": self.ov,
            "qk": self.qk,
            "pca": self.pca,
            "probes": [
                {**p, "pattern": torch.as_tensor(p["pattern"]).tolist()} for p in self.probes
            ],
            "provenance": self.provenance,
        }
        return {"atlas.csv": self.to_dataframe().to_csv(index=False),
                "atlas.json": dumps_strict(payload) + "\n"}  # fmt: skip

    def save(self, directory: "str | os.PathLike") -> Path:
        """``atlas.csv`` and ``atlas.json`` in ``directory`` (each written atomically); ``load``
        reads them back."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in self.files().items():
            write_text_atomic(directory / name, text)
        return directory

    @classmethod
    def load(cls, directory: "str | os.PathLike") -> "HeadAtlas":
        """The atlas ``save`` (or ``lens-attn atlas``, ``discover --corpus``) wrote to ``directory``."""
        fields = ("n_layers", "n_heads", "metrics", "decile_edges", "examples", "deciles")
        payload = load_json(directory, "atlas", "HeadAtlas", required=fields)
        probes = [{**p, "pattern": torch.tensor(nan_for_null(p["pattern"]), dtype=torch.float32)}
                  for p in payload.get("probes", [])]  # fmt: skip
        return cls(
            payload["n_layers"],
            payload["n_heads"],
            {
                k: torch.tensor(nan_for_null(v), dtype=torch.float32)
                for k, v in payload["metrics"].items()
            },  # fmt: skip
            torch.tensor(nan_for_null(payload["decile_edges"]), dtype=torch.float32),
            pd.DataFrame(payload["examples"]),
            pd.DataFrame(payload["deciles"]),
            payload.get("ov", {}),
            payload.get("qk", {}),
            payload.get("pca", {}),
            probes,
            payload.get("provenance", {}),
        )


def _records(table: pd.DataFrame) -> list[dict]:
    """A table's rows as plain JSON values (numpy scalars as Python ones)."""

    def plain(value):
        return value.item() if isinstance(value, np.generic) else value

    return [{k: plain(v) for k, v in row.items()} for row in table.to_dict("records")]


# -------------------------------------------------------------------------------------- finalize


def _records_table(records, layer: int, decode, before: int, *, rank_column: bool) -> pd.DataFrame:
    """A layer's records as rows (empty slots dropped)."""
    if records.rank is None:
        return pd.DataFrame()
    fields = {k: v.cpu() for k, v in records.fields.items()}
    keep = torch.isfinite(records.rank.cpu())
    rows = []
    for head in range(keep.shape[0]):
        for slot in keep[head].nonzero().flatten().tolist():
            context = [t for t in fields["context"][head, slot].tolist()]
            first = next((i for i, t in enumerate(context) if t >= 0), before)
            query_pos = int(fields["query_pos"][head, slot])
            keys = [
                {"key_pos": int(p), "offset": int(p) - query_pos if p >= 0 else None,
                 "token": decode(int(t)), "weight": float(w)}
                for p, t, w in zip(fields["key_pos"][head, slot].tolist(),
                                   fields["key_token"][head, slot].tolist(),
                                   fields["key_weight"][head, slot].tolist(), strict=True)
            ]  # fmt: skip
            context_ids = [t for t in context if t >= 0]
            row = {
                "layer": layer,
                "head": head,
                "doc": int(fields["doc"][head, slot]),
                "query_pos": query_pos,
                "activation": float(fields["activation"][head, slot]),
                "query_token": decode(context[before]),
                "context": [decode(t) for t in context_ids],
                "context_query": before - first,
                "keys": keys,
            }
            if rank_column:
                row["rank"] = slot
            else:
                row["_slot"] = slot
            rows.append(row)
    return pd.DataFrame(rows)


@torch.no_grad()
def finalize(model, states, config, *, per_decile, n_tokens, seed, window, circuits, pca, probes,
             log) -> HeadAtlas:  # fmt: skip
    """Turn the accumulated layer states into a ``HeadAtlas``."""
    from lens_attn.probes import str_tokens

    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    # token strings: every id the tables show, decoded once
    ids: set[int] = set()
    for state in states:
        for records in (state.top, state.sample):
            if records.rank is not None:
                ids.update(records.fields["context"].unique().tolist())
                ids.update(records.fields["key_token"].unique().tolist())
    cache = _Decoder(model, str_tokens)
    cache.add(sorted(i for i in ids if i >= 0))

    metrics = {name: torch.stack([s.metrics.means()[name] for s in states]).float()
               for name in ("activation", *METRICS, *TARGETS)}  # fmt: skip
    metrics["count"] = torch.stack([s.metrics.sums["count"] for s in states]).float()
    edges = torch.full((n_layers, n_heads, 9), float("nan"))
    for layer, state in enumerate(states):
        if state.histogram.counts is not None:
            edges[layer] = state.histogram.quantiles(DECILE_QS)

    examples = pd.concat([_records_table(s.top, layer, cache, config.before, rank_column=True)
                          for layer, s in enumerate(states)], ignore_index=True)  # fmt: skip
    samples = pd.concat([_records_table(s.sample, layer, cache, config.before, rank_column=False)
                         for layer, s in enumerate(states)], ignore_index=True)  # fmt: skip
    deciles = _decile_samples(samples, edges, per_decile)
    result = HeadAtlas(n_layers, n_heads, metrics, edges, examples, deciles)
    if pca:
        result.pca = _pca(model, states)
    if circuits and len(examples):
        result.ov, result.qk = _circuit_tables(model, states, config.before, cache)
        log(f"atlas circuits: OV and QK tables of {n_layers * n_heads} heads")
    if probes:
        result.probes = _probe_patterns(model, cache)
    import lens_attn

    result.provenance = {
        "model": getattr(model.cfg, "model_name", None), "n_tokens": n_tokens, "seed": seed,
        "k": config.k, "per_decile": per_decile, "window": window, "n_keys": config.n_keys,
        "lens_attn_version": lens_attn.__version__,
    }  # fmt: skip
    return result


class _Decoder:
    """Token id -> display string, decoded once per id."""

    def __init__(self, model, str_tokens):
        self.model, self.str_tokens, self.table = model, str_tokens, {}

    def add(self, ids: list[int]) -> None:
        new = [i for i in ids if i not in self.table]
        if new:
            self.table.update(zip(new, self.str_tokens(self.model, torch.tensor(new)), strict=True))

    def __call__(self, token: int) -> str:
        if token < 0:
            return ""
        if token not in self.table:
            self.add([token])
        return self.table[token]


def _decile_samples(samples: pd.DataFrame, edges: Tensor, per_decile: int) -> pd.DataFrame:
    """Per head and decile, the ``per_decile`` sampled examples of highest priority."""
    if samples.empty:
        return samples
    parts = []
    for (layer, head), rows in samples.groupby(["layer", "head"], sort=True):
        cut = edges[layer, head].tolist()
        decile = torch.bucketize(torch.tensor(rows["activation"].to_numpy()), torch.tensor(cut))
        rows = rows.assign(decile=decile.tolist()).sort_values(["decile", "_slot"])
        parts.append(rows.groupby("decile").head(per_decile))
    return pd.concat(parts, ignore_index=True).drop(columns="_slot")


def _pca(model, states) -> dict[str, dict]:
    """Per head, the sampled output vectors ``z W_O`` on their first two principal components."""
    out = {}
    for layer, state in enumerate(states):
        if state.sample.rank is None:
            continue
        z = state.sample.fields["z"]
        finite = torch.isfinite(state.sample.rank)
        for head in range(z.shape[0]):
            vectors = z[head][finite[head]] @ model.W_O[layer, head].float()
            if len(vectors) < 3:
                continue
            centred = vectors - vectors.mean(0)
            _, s, v = torch.linalg.svd(centred, full_matrices=False)
            coords = centred @ v[:2].T
            total = (s**2).sum().clamp(min=1e-12)
            out[head_label(layer, head)] = {
                "coords": [[round(float(x), 4) for x in row] for row in coords.cpu()],
                "activation": [round(float(a), 4) for a in
                               state.sample.fields["activation"][head][finite[head]].cpu()],
                "explained": [float(s[i] ** 2 / total) for i in range(min(2, len(s)))],
            }  # fmt: skip
    return out


N_SOURCES = 5  # tokens per head whose OV write is shown
N_QK = 8  # query and key tokens per head among which QK pairs are scored


def _circuit_tables(model, states, before: int, decode) -> tuple[dict, dict]:
    """OV and QK tables of every head (``lens_attn.atlases.circuits``) from its top examples."""
    from lens_attn.atlases.circuits import ov_top_tokens, qk_scores
    from lens_attn.scoring.ov_circuit import effective_embedding

    plans = {}
    for layer, state in enumerate(states):
        if state.top.rank is None:
            continue
        f = {k: v.cpu() for k, v in state.top.fields.items()}
        finite = torch.isfinite(state.top.rank.cpu())
        for head in range(finite.shape[0]):
            keep = finite[head]
            key_tokens = f["key_token"][head][keep].flatten()
            weights = f["key_weight"][head][keep].flatten()
            real_key = f["key_pos"][head][keep].flatten() >= 0
            totals: dict[int, float] = {}
            for t, w in zip(key_tokens[real_key].tolist(), weights[real_key].tolist(), strict=True):
                totals[t] = totals.get(t, 0.0) + w
            keys = sorted(totals, key=lambda t: -totals[t])
            queries = list(dict.fromkeys(f["context"][head][keep][:, before].tolist()))
            plans[(layer, head)] = (keys[:N_SOURCES], totals, queries[:N_QK], keys[:N_QK])
    needed = sorted({t for s, _, q, k in plans.values() for t in (*s, *q, *k) if t >= 0})
    if not needed:
        return {}, {}
    embedded = effective_embedding(model, torch.tensor(needed)).to(model.W_E.dtype)
    row = {t: i for i, t in enumerate(needed)}
    ov, qk = {}, {}
    for (layer, head), (sources, totals, queries, keys) in plans.items():
        name = head_label(layer, head)
        if sources:
            logits, ids = ov_top_tokens(model, layer, head, embedded[[row[t] for t in sources]])
            decode.add(sorted(set(ids.flatten().tolist())))
            ov[name] = [
                {"source": decode(t), "weight": round(totals[t], 4),
                 "top": [[decode(i), round(float(v), 3)] for i, v in zip(id_row.tolist(), lrow, strict=True)]}
                for t, id_row, lrow in zip(sources, ids, logits.tolist(), strict=True)
            ]  # fmt: skip
        queries = [t for t in queries if t >= 0]
        if queries and keys:
            scores = qk_scores(model, layer, head, embedded[[row[t] for t in queries]],
                               embedded[[row[t] for t in keys]])  # fmt: skip
            order = scores.flatten().argsort(descending=True)[:N_QK].tolist()
            qk[name] = [
                {"query": decode(queries[i // len(keys)]), "key": decode(keys[i % len(keys)]),
                 "score": round(float(scores.flatten()[i]), 3)}
                for i in order
            ]  # fmt: skip
    return ov, qk


def _probe_patterns(model, decode) -> list[dict]:
    """Every head's pattern on two short probes: a repeated random sequence and a shipped text."""
    from lens_attn.patterns import capture_patterns
    from lens_attn.probes import induction_probes, natural_prompts, str_tokens

    repeated = induction_probes(model, periods=(12,), n_per_period=1)[0].tokens
    natural = model.to_tokens(natural_prompts()[1], truncate=False)[0][:40].cpu()
    out = []
    for name, tokens in (("repeated random tokens", repeated), ("a shipped sentence", natural)):
        tokens = tokens[: int(model.cfg.n_ctx)]
        patterns = capture_patterns(model, tokens[None])
        grid = torch.stack([patterns.layer(layer, 0) for layer in patterns.layers])
        out.append({"name": name, "tokens": str_tokens(model, tokens), "pattern": grid})
    return out
