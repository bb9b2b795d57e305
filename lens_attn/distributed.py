"""Data-parallel runs on ``torch.distributed``: shard prompts across processes, add up their sums.

``score_heads`` keeps only sums and counts, so a run split over ``world_size`` processes merges
exactly: each rank takes the deterministic shard ``items[rank::world_size]``, accumulates, and the
per-head sums are all-reduced; every rank returns the merged result. Rank 0 writes the run folder.

    torchrun --nproc-per-node 2 -m lens_attn.cli discover --out runs/x    # one machine, 2 processes
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \
        --rdzv-endpoint HOST:29500 -m lens_attn.cli discover ...          # several machines

A process group is used when passed explicitly, or when one is already initialised, or when
``torchrun``'s environment (``WORLD_SIZE`` > 1) asks for one: then it is initialised here with
``nccl`` on CUDA and ``gloo`` on the CPU. With ``nccl`` each rank must hold its model on its own
GPU: load it on :func:`local_cuda_device` (``cuda:$LOCAL_RANK``). The caller ends the run with
``torch.distributed.destroy_process_group()``.
"""

import os

import torch
import torch.distributed as dist
from torch import Tensor


def current_group(process_group=None, *, device: "str | torch.device" = "cpu"):
    """The process group to use, or ``None`` for a single-process run."""
    if process_group is not None:
        return process_group
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD if dist.get_world_size() > 1 else None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available():
        device = torch.device(device)
        if device.type == "cuda":
            # nccl's collectives run on the current device: make it this rank's (model's) GPU
            torch.cuda.set_device(device.index if device.index is not None else 0)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return dist.group.WORLD
    return None


def local_cuda_device(n_devices: int = 1) -> torch.device:
    """This process's (first) GPU under ``torchrun``: ``cuda:{LOCAL_RANK * n_devices}``, so that
    ranks holding a model split over ``n_devices`` GPUs don't overlap (outside torchrun: cuda:0)."""
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) * n_devices)


def process_device(device: "str | torch.device | None", *, n_devices: int = 1):
    """``device`` for this process: under ``torchrun`` on a CUDA machine, ``None`` and ``"cuda"``
    mean :func:`local_cuda_device`; any other value (``"cpu"``, ``"cuda:3"``) is kept."""
    under_torchrun = "LOCAL_RANK" in os.environ
    if under_torchrun and device in (None, "cuda") and torch.cuda.is_available():
        return local_cuda_device(n_devices)
    return device


def rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def world_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def is_main(group=None) -> bool:
    """True on the process that writes outputs (rank 0, or the only process)."""
    if group is None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return rank(group) == 0


def shard(items: list, group) -> list:
    """This rank's deterministic share of ``items``: ``items[rank::world_size]``.

    Refuses a split that would leave a rank with nothing (it could not take part in the sums).
    """
    size = world_size(group)
    if len(items) < size:
        raise ValueError(
            f"{len(items)} prompts for {size} processes; give at least one prompt per process"
        )
    return items[rank(group) :: size]


def collective_device(group) -> torch.device:
    """Where ``group``'s collectives run: this rank's GPU for nccl, the CPU otherwise."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(
    tensors: dict[str, Tensor], group, *, device: "str | torch.device" = "cpu"
) -> dict[str, Tensor]:
    """Sum each tensor over the ranks of ``group`` (no-op without a group); returns new tensors.

    The collectives run on ``device`` (CPU for gloo, the rank's GPU for nccl); results stay there.
    """
    if group is None:
        return tensors
    out = {}
    for key, value in tensors.items():
        buffer = value.detach().to(device).clone()
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
        out[key] = buffer
    return out
