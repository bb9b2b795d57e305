"""Devices: which one, how many, and where each layer of a model lives (``n_devices > 1``)."""

from typing import Literal, get_args

import torch
from transformer_lens.utilities.multi_gpu import get_device_for_block_index

from lens_attn.compat import HookedTransformer, HookedTransformerConfig

DeviceType = Literal["cpu", "cuda", "mps"]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> cuda if available, else cpu. Valid types: cpu, cuda, cuda:<index>, mps."""
    valid = "cpu, cuda, cuda:<index>, mps, or None (cuda if available, else cpu)"
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; valid: {valid}") from None
    if resolved.type not in get_args(DeviceType):
        raise ValueError(f"unknown device {device!r}; valid: {valid}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use 'cpu'")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available; use 'cpu'")
    return resolved


def check_n_devices(n_devices: int, device: torch.device) -> None:
    if isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1:
        raise ValueError(f"n_devices must be a positive integer, got {n_devices!r}")
    if n_devices > 1 and device.type != "cuda":
        raise ValueError(f"n_devices={n_devices} needs device='cuda', got {str(device)!r}")
    first = device.index or 0  # the layers go to GPUs first, first + 1, ...
    visible = torch.cuda.device_count()
    if n_devices > 1 and first + n_devices > visible:
        raise ValueError(
            f"n_devices={n_devices} from {str(device)!r} needs GPUs "
            f"{first}..{first + n_devices - 1} but only {visible} CUDA devices are visible"
        )


def layer_devices(cfg: HookedTransformerConfig) -> list[torch.device]:
    """The device of every block of a ``HookedTransformer`` split over ``cfg.n_devices`` GPUs.

    TransformerLens's own mapping, ``multi_gpu.get_device_for_block_index``: block ``i`` goes to GPU
    ``cfg.device.index + i * n_devices // n_layers``, i.e. contiguous runs of blocks (3 layers on 2
    GPUs: blocks 0, 1 on the first, block 2 on the second). ``HookedTransformer.forward`` moves the
    residual stream to exactly this device before block ``i``. A CPU config maps every block to
    the CPU.
    """
    return [get_device_for_block_index(layer, cfg) for layer in range(cfg.n_layers)]


def split_across_devices(model: HookedTransformer) -> HookedTransformer:
    """Put each module of ``model`` on the device its forward pass expects; returns the model.

    TransformerLens 3.9's ``move_model_modules_to_device`` puts *every* module on the one GPU with
    the most free memory, while ``forward`` moves the residual stream to
    ``get_device_for_block_index(i, cfg)`` before block ``i``. This follows ``forward``: the
    embedding on block 0's device, block ``i`` on :func:`layer_devices`'s ``[i]``, and ``ln_final``
    and the unembedding on the last block's device (where the residual stream is after the last
    block). With ``n_devices == 1`` it is ``move_model_modules_to_device`` unchanged.
    """
    if model.cfg.n_devices == 1:
        model.move_model_modules_to_device()
        return model
    devices = layer_devices(model.cfg)
    model.embed.to(devices[0])
    if model.cfg.positional_embedding_type != "rotary":
        model.pos_embed.to(devices[0])
    for block, device in zip(model.blocks, devices, strict=True):
        block.to(device)
    if hasattr(model, "ln_final"):
        model.ln_final.to(devices[-1])
    model.unembed.to(devices[-1])
    return model


def bridge_device_map(backend: str, n_devices: int) -> tuple[str | dict | None, dict | None]:
    """accelerate placement for a multi-GPU bridge, from TransformerLens's own resolver."""
    if backend != "bridge" or n_devices == 1:
        return None, None
    from transformer_lens.utilities.multi_gpu import resolve_device_map

    return resolve_device_map(n_devices, None, None)
