"""Checks shared by the loaders and the API: config value types, readable weights, finite weights,
token ids. Each raises a :mod:`lens_attn.errors` exception naming the file or argument, the field,
what was given and what is valid.
"""

import math
import numbers
import os
import pickle
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lens_attn.errors import CheckpointError, ConfigError, InputError

_MISSING = object()


def config_int(
    raw: dict, key: str, *, source: str, minimum: int = 1, optional: bool = False
) -> int | None:
    """``raw[key]`` if it is an ``int`` (not a bool, float or string) ``>= minimum``; else ConfigError.

    With ``optional``, an absent key or ``null`` gives ``None``.
    """
    value = raw.get(key, _MISSING)
    if optional and (value is _MISSING or value is None):
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        shown = "missing" if value is _MISSING else f"{type(value).__name__} {value!r}"
        raise ConfigError(
            f"{source}: {key} must be a whole number >= {minimum} (a JSON integer), got {shown}"
        )
    if value < minimum:
        raise ConfigError(f"{source}: {key} must be a whole number >= {minimum}, got {value}")
    return value


def config_float(raw: dict, key: str, *, source: str, optional: bool = False) -> float | None:
    """``raw[key]`` as a float if it is a finite number ``> 0`` (not a bool or string); else ConfigError."""
    value = raw.get(key, _MISSING)
    if optional and (value is _MISSING or value is None):
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        shown = "missing" if value is _MISSING else f"{type(value).__name__} {value!r}"
        raise ConfigError(f"{source}: {key} must be a positive finite number, got {shown}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{source}: {key} must be a positive finite number, got {value}")
    return float(value)


@contextmanager
def reading_checkpoint(path: "str | os.PathLike") -> Iterator[None]:
    """Turn what a corrupt, truncated or unsafe weights file raises into a CheckpointError naming it."""
    try:
        yield
    except CheckpointError:
        raise
    except pickle.UnpicklingError as err:  # what weights_only=True raises for an unsafe pickle
        reason = str(err).strip().splitlines()[0] if str(err).strip() else "unpickling failed"
        raise CheckpointError(
            f"{path} was refused: it is not a plain tensor checkpoint ({reason[:200]}); "
            "lens-attn loads .bin/.pth files with torch.load(weights_only=True) only"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        if isinstance(err, (FileNotFoundError, PermissionError)):
            raise
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise CheckpointError(
            f"{path} is corrupt or truncated and cannot be read: {reason}"
        ) from None
    except Exception as err:  # safetensors' SafetensorError derives from Exception only
        if type(err).__name__ != "SafetensorError":
            raise
        reason = " ".join(str(err).split())[:200]
        raise CheckpointError(
            f"{path} is corrupt or truncated and cannot be read: {reason}"
        ) from None


def check_finite_weights(named_tensors: Iterable, *, source: str) -> None:
    """CheckpointError naming the first tensor holding a NaN or an infinity (meta tensors skipped)."""
    import torch

    for name, tensor in named_tensors:
        if tensor.device.type == "meta" or not tensor.is_floating_point() or not tensor.numel():
            continue
        low, high = torch.aminmax(tensor)  # NaN propagates; 4x faster than isfinite on bfloat16
        if bool(torch.isfinite(low) & torch.isfinite(high)):
            continue
        bad = ~torch.isfinite(tensor)
        if bool(bad.any()):
            count = int(bad.sum())
            raise CheckpointError(
                f"{source}: weight {name} holds {count} non-finite value{'s' * (count != 1)} "
                "(NaN or infinity); the checkpoint is corrupt"
            )


def check_token_ids(tokens, d_vocab: int, *, what: str = "tokens") -> None:
    """InputError unless ``tokens`` is an integer tensor with every id in ``0 .. d_vocab - 1``."""
    import torch

    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise InputError(
            f"{what} must be an integer tensor of token ids (torch.long), got dtype {tokens.dtype}"
        )
    if tokens.numel() == 0:
        return
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= d_vocab:
        bad = low if low < 0 else high
        raise InputError(
            f"{what} hold token id {bad}, outside the model's vocabulary; valid ids: 0..{d_vocab - 1}"
        )


def read_text_file(path: Path, *, what: str) -> str:
    """A UTF-8 text file's contents; InputError naming the file if it is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(
            f"{what} {path} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8"
        ) from None
