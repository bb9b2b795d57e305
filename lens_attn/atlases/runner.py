"""``atlas(model, texts)``: stream a corpus once and keep, per head, what a researcher reads.

    >>> texts = ["The cat sat on the mat. The cat sat on the mat."]
    >>> head_atlas = lens_attn.atlas(model, texts, k=5, progress=False)
    >>> head_atlas.top_examples("L1H5", 3).columns[:3].tolist()
    ['doc', 'query_pos', 'activation']

One forward pass per batch of windows (``lens_attn.atlases.corpus``), with hooks on every layer's
``hook_pattern`` and ``hook_z`` that reduce the activations inside the hook
(``lens_attn.atlases.reduce``), as ``score_heads`` does: no cache, one layer's pattern alive at a time,
the forward stopped inside the last layer right after its ``hook_z`` (its output projection and MLP,
the final norm and the unembedding are never read, so never run). Memory is bounded by ``k``, the sample
sizes and the number of heads; texts are read and tokenized lazily, a bounded buffer of windows at a
time, so the corpus is never held whole.

Deterministic under ``seed``: the top examples are exact, and the samples are chosen by a hash of
``(seed, layer, head, doc, query_pos)``, so they do not depend on batching or on sharding. Under
``torchrun`` (``lens_attn.distributed``) the windows are sharded ``[rank::world_size]`` in buffer
order and the ranks' records and sums merged; every rank returns the same atlas.
"""

import itertools
import sys
import time
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from lens_attn import compat, distributed
from lens_attn.atlases.accumulators import LogHistogram, Records, position_hash
from lens_attn.atlases.corpus import Window, iter_windows
from lens_attn.atlases.reduce import (
    AtlasBatch,
    AtlasState,
    BatchPass,
    ReduceConfig,
    Scratch,
    sample_floor,
)
from lens_attn.errors import InputError
from lens_attn.scoring.protocol import hook_name

DEFAULT_SEED = 0
BUFFER = 64  # windows read ahead and sorted by length, so a batch pads little
SAMPLE_FACTOR = 3  # uniform sample: 3x the examples the deciles show (see accumulators)


def atlas(
    model,
    texts: "Iterable[str] | None" = None,
    *,
    k: int = 20,
    per_decile: int = 5,
    n_keys: int = 5,
    batch_size: int = 8,
    window: int | None = None,
    context: tuple[int, int] = (24, 6),
    seed: int = DEFAULT_SEED,
    circuits: bool = True,
    pca: bool = True,
    probes: bool = True,
    process_group=None,
    progress: bool = True,
    log=None,
):
    """Stream ``texts`` through ``model`` once and build a ``HeadAtlas`` of every head.

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge`` in compatibility mode.
        texts: the corpus, a list (or any re-iterable) of strings; ``None``: ``default_corpus()``.
            Example ``doc`` numbers index it in input order.
        k: top examples kept per head (exactly the ``k`` highest activations of the corpus).
        per_decile: examples shown per activation decile.
        n_keys: attended keys kept per example (the highest attention weights).
        batch_size: windows per forward pass.
        window: tokens per window, BOS included; ``None``: the model's context ``n_ctx``.
        context: tokens kept before and after each example's query position, for display.
        seed: chooses the uniform samples (the top examples do not depend on it).
        circuits: compute the OV and QK tables (``lens_attn.atlases.circuits``).
        pca: a 2-D PCA of each head's output vectors ``z W_O`` over its sampled positions.
        probes: keep each head's pattern on two short probes (a repeated random sequence and a
            shipped sentence), for the page.
        process_group: ``torch.distributed`` group to shard over (see ``lens_attn.distributed``).
        progress: show tokens per second on the terminal.
        log: a ``print``-like function given one line per stage (``None``: silent).

    Returns:
        ``HeadAtlas`` (``lens_attn.atlases.result``).
    """
    from lens_attn.atlases.corpus import default_corpus
    from lens_attn.atlases.result import HeadAtlas, finalize

    for name, value in (("k", k), ("per_decile", per_decile), ("n_keys", n_keys),
                        ("batch_size", batch_size)):  # fmt: skip
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    n_ctx = int(model.cfg.n_ctx)
    window = n_ctx if window is None else window
    if not isinstance(window, int) or not 2 <= window <= n_ctx:
        raise ValueError(
            f"window must be an integer in 2..{n_ctx} (the model's n_ctx), got {window!r}"
        )
    if isinstance(texts, str):
        raise InputError("texts must be a list of strings, not one string; wrap it: [text]")
    if texts is None:
        texts = default_corpus()
    log = log or (lambda line: None)
    group = distributed.current_group(process_group, device=model.cfg.device)
    config = ReduceConfig(k=k, n_keys=n_keys, before=context[0], after=context[1],
                          sample_size=10 * per_decile * SAMPLE_FACTOR)  # fmt: skip
    state = AtlasState(model.cfg.n_layers, model.cfg.n_heads, config)
    start = time.perf_counter()
    n_tokens = _stream(model, texts, window, batch_size, state, config, seed, group, progress)
    elapsed = time.perf_counter() - start
    if group is not None:
        n_tokens = _merge_ranks(state, n_tokens, group)
    log(
        f"atlas pass: {n_tokens} tokens in {elapsed:.1f}s ({n_tokens / max(elapsed, 1e-9):.0f} tokens/s)"
    )
    result: HeadAtlas = finalize(
        model, state.layers(), config, per_decile=per_decile, n_tokens=n_tokens, seed=seed,
        window=window, circuits=circuits, pca=pca, probes=probes, log=log,
    )  # fmt: skip
    return result


def _buffers(windows: Iterable[Window], batch_size: int, group) -> Iterator[list[list[Window]]]:
    """The windows a buffer at a time: ``BUFFER * batch_size`` read ahead, this rank's share of
    them sorted by length (little padding) and cut into batches. Deterministic for a given corpus."""
    windows = iter(windows)
    while True:
        buffer = list(itertools.islice(windows, BUFFER * batch_size))
        if not buffer:
            return
        mine = buffer[distributed.rank(group) :: distributed.world_size(group)]
        mine.sort(key=lambda w: len(w.tokens))
        yield [mine[begin : begin + batch_size] for begin in range(0, len(mine), batch_size)]


def _positions(model, windows: list[Window], seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(tokens, real, position_hash)`` ``[batch, pos]`` of a batch of windows, right-padded:
    ``real`` marks the text's own tokens (not padding, not an added BOS)."""
    from lens_attn.probes import pad_token_id

    tokens = torch.nn.utils.rnn.pad_sequence([w.tokens for w in windows], batch_first=True,
                                             padding_value=pad_token_id(model))  # fmt: skip
    length, doc, start, offset = _window_fields(windows)
    pos = torch.arange(tokens.shape[1])[None]
    hashed = position_hash(doc[:, None], start[:, None] + pos - offset[:, None], seed)
    real = (pos < length[:, None]) & (pos >= offset[:, None])
    device = model.cfg.device
    return tokens.to(device), real.to(device), hashed.to(device)


def _window_fields(windows: list[Window]) -> Tensor:
    """``[4, batch]``: each window's length, ``doc``, ``start`` and ``offset``."""
    return torch.tensor([(len(w.tokens), w.doc, w.start, w.offset) for w in windows]).T


def _make_batch(windows: list[Window], positions, config: ReduceConfig) -> AtlasBatch:
    """The batch of ``windows``, whose ``_positions`` are ``positions``."""
    tokens, real, hashed = positions
    _, doc, start, offset = _window_fields(windows).to(tokens.device)
    return AtlasBatch.build(tokens, real, doc, start, offset, hashed, before=config.before,
                            after=config.after)  # fmt: skip


@torch.no_grad()
def _stream(model, texts, window, batch_size, state, config, seed, group, progress) -> int:
    n_layers = model.cfg.n_layers
    grams = [_gram(model, layer) for layer in range(n_layers)]
    names = {}
    for layer in range(n_layers):
        names[hook_name(model, "pattern", layer)] = ("pattern", layer)
        names[hook_name(model, "z", layer)] = ("z", layer)
    meter = _Progress(progress and distributed.is_main(group))
    scratch = Scratch()  # one buffer for the per-layer temporaries of every batch
    work: BatchPass | None = None  # the current batch's, read by the hooks

    def hook_fn(activation, hook):
        kind, layer = names[hook.name]
        if kind == "pattern":
            work.pattern(layer, activation)
        else:
            work.z(layer, activation)
            if layer == n_layers - 1:
                raise compat.StopForward  # nothing after the last hook_z is read
        return None

    n_tokens = 0
    with model.hooks(fwd_hooks=[(name, hook_fn) for name in names]):  # attached once
        for buffer in _buffers(iter_windows(model, texts, window), batch_size, group):
            positions = [_positions(model, windows, seed) for windows in buffer]
            floor = sample_floor([p[1:] for p in positions], state)
            for windows, position in zip(buffer, positions, strict=True):
                batch = _make_batch(windows, position, config)
                work = BatchPass(batch, state, grams, config, floor, scratch)
                compat.run_until_stopped(model, batch.tokens)
                work.finish()
                n_tokens += sum(len(w.tokens) for w in windows)
                meter.update(n_tokens)
    meter.close(n_tokens)
    return n_tokens


def _gram(model, layer: int) -> Tensor:
    w_o = model.W_O[layer].detach()  # [head_index, d_head, d_model]
    return (w_o @ w_o.transpose(-1, -2)).to(
        torch.float32 if w_o.dtype == torch.float32 else w_o.dtype
    )


class _Progress:
    """Tokens per second on a terminal, at most a few times a second (stderr)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.start = time.perf_counter()
        self.last = 0.0

    def update(self, n_tokens: int) -> None:
        now = time.perf_counter()
        if self.enabled and now - self.last > 0.25:
            self.last = now
            rate = n_tokens / max(now - self.start, 1e-9)
            print(f"\ratlas: {n_tokens} tokens, {rate:.0f} tokens/s", end="", file=sys.stderr)

    def close(self, n_tokens: int) -> None:
        if self.enabled:
            self.update(n_tokens)
            print(file=sys.stderr)


def _merge_ranks(state: AtlasState, n_tokens: int, group) -> int:
    """Every rank's records and sums merged: records by their rank value, sums added."""
    import torch.distributed as dist

    mine = {
        "records": [(r.rank.cpu(), {k: v.cpu() for k, v in r.fields.items()}) if r.rank is not None
                    else None for r in (state.top, state.sample)],
        "sums": {k: v.cpu() for k, v in state.metrics.sums.items()},
        "histogram": state.histogram.counts,
        "n_tokens": n_tokens,
    }  # fmt: skip
    gathered = [None] * distributed.world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    merged = [Records(r.size) for r in (state.top, state.sample)]
    histogram = LogHistogram()
    sums: dict[str, Tensor] = {}
    for part in gathered:  # in rank order: the same result on every rank
        for records, got in zip(merged, part["records"], strict=True):
            if got is not None:
                records.offer(*got)
        if part["histogram"] is not None:
            histogram.counts = part["histogram"] + (
                0 if histogram.counts is None else histogram.counts
            )
        for key, value in part["sums"].items():
            sums[key] = value if key not in sums else sums[key] + value
    state.top, state.sample = merged
    state.histogram = histogram
    state.metrics.sums = sums
    return sum(part["n_tokens"] for part in gathered)
