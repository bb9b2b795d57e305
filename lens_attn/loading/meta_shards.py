"""Meta's model-parallel shards (``consolidated.NN.pth``): found, checked, memory-mapped, merged.

Each shard holds one rank's slice of every tensor (fairscale): column-parallel weights are split
along dim 0, row-parallel ones and the embedding along dim 1, norms replicated (:data:`SPLIT_DIM`).
:mod:`lens_attn.loading.meta` reads ``params.json`` and turns the merged tensors into transformers'
names; its ``MetaReader`` merges one tensor at a time from :func:`open_meta_shards`'s mapped shards.
"""

import re
from pathlib import Path

import torch
from torch import Tensor

from lens_attn.validation import reading_checkpoint

SHARD_PATTERN = re.compile(r"^consolidated\.(\d+)\.pth$")
# Meta tensor name (without ``layers.<l>.``) -> model-parallel split dim (None: replicated).
SPLIT_DIM: dict[str, int | None] = {
    "tok_embeddings.weight": 1,
    "norm.weight": None,
    "output.weight": 0,
    "rope.freqs": None,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w2.weight": 1,
    "feed_forward.w3.weight": 0,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
}
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")


def _shard_name(index: int) -> str:
    return f"consolidated.{index:02d}.pth"


def _load_shard(path: Path) -> dict[str, Tensor]:
    # mmap: a 70B rank is ~17 GB; only the slices we touch are paged in.
    with reading_checkpoint(path):  # truncated, raw-pickle or unsafe files: CheckpointError
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def open_meta_shards(directory: str | Path, dim: int) -> list[dict[str, Tensor]]:
    """Every shard's state dict, memory-mapped and checked (see
    :func:`lens_attn.loading.meta.load_meta_state_dict`); ``dim`` is params.json's."""
    directory = Path(directory)
    found = {}
    for path in directory.iterdir():
        match = SHARD_PATTERN.match(path.name)
        if match:
            found[int(match.group(1))] = path
    if 0 not in found:
        raise FileNotFoundError(
            f"Meta checkpoint {directory} has no {_shard_name(0)} (found shards: "
            f"{sorted(p.name for p in found.values()) or 'none'}); expected consolidated.00.pth .. "
            "consolidated.NN.pth next to params.json"
        )
    first = _load_shard(found[0])
    if "tok_embeddings.weight" not in first:
        raise ValueError(f"{found[0]} has no tok_embeddings.weight; is it a Llama checkpoint?")
    width = first["tok_embeddings.weight"].shape[1]
    if width == 0 or dim % width != 0:
        raise ValueError(
            f"{found[0]}: tok_embeddings slice is {width} wide, which does not divide params.json "
            f"dim={dim}"
        )
    n_shards = dim // width
    expected = set(range(n_shards))
    missing = sorted(expected - set(found))
    if missing:
        raise FileNotFoundError(
            f"Meta checkpoint {directory} is incomplete: missing "
            f"{[_shard_name(i) for i in missing]}. params.json dim={dim} and a {width}-wide "
            f"embedding slice in {_shard_name(0)} mean {n_shards} shards, "
            f"{_shard_name(0)} .. {_shard_name(n_shards - 1)}"
        )
    extra = sorted(set(found) - expected)
    if extra:
        raise ValueError(
            f"Meta checkpoint {directory} has unexpected shards {[found[i].name for i in extra]}: "
            f"params.json dim={dim} and a {width}-wide embedding slice mean {n_shards} "
            "shards"
        )
    shards = [first] + [_load_shard(found[i]) for i in range(1, n_shards)]
    names = set(first)
    for index, shard in enumerate(shards[1:], start=1):
        if set(shard) != names:
            diff = sorted(names.symmetric_difference(shard))
            raise ValueError(
                f"{_shard_name(index)} and {_shard_name(0)} hold different tensors: {diff[:8]}"
            )
    return shards


def _split_dim(name: str) -> int | None:
    layer_match = _LAYER_KEY.match(name)
    suffix = layer_match.group(2) if layer_match else name
    if suffix not in SPLIT_DIM:
        raise ValueError(
            f"unknown tensor {name!r} in {_shard_name(0)}; a Llama 2 checkpoint holds only "
            f"{sorted(SPLIT_DIM)} (per layer under layers.<l>.)"
        )
    return SPLIT_DIM[suffix]


def merge_meta_shards(
    shards: list[dict[str, Tensor]], *, materialize: bool = True
) -> dict[str, Tensor]:
    """One state dict from the shards of :func:`open_meta_shards`.

    Replicated tensors (norms, ``rope.freqs``: small) must agree across shards. Split tensors are
    concatenated, or with ``materialize=False`` stood in for by ``meta``-device tensors of the
    merged shape (for checking shapes without reading the weights).
    """
    first, n_shards = shards[0], len(shards)
    names = set(first)
    merged: dict[str, Tensor] = {}
    for name in sorted(names):
        dim = _split_dim(name)
        parts = [shard[name] for shard in shards]
        if dim is None:
            for index, part in enumerate(parts[1:], start=1):
                if not torch.equal(part, parts[0]):
                    raise ValueError(
                        f"{name} should be replicated on every shard but differs between "
                        f"{_shard_name(0)} and {_shard_name(index)}"
                    )
            merged[name] = parts[0]
        elif not materialize:
            shape = list(parts[0].shape)
            shape[dim] = sum(part.shape[dim] for part in parts)
            merged[name] = torch.empty(shape, dtype=parts[0].dtype, device="meta")
        else:
            merged[name] = torch.cat(parts, dim=dim) if n_shards > 1 else parts[0]
    return merged
