"""Read a checkpoint's tensors one at a time, by their transformers names, without holding the file.

Every source (a Hugging Face directory of safetensors or ``.bin`` shards, Meta's
``consolidated.NN.pth`` shards, a GGUF file) is opened as a :class:`CheckpointReader`: a checked
``LlamaConfig`` plus ``reader.read(name, dtype)``, which returns one tensor under its
``LlamaForCausalLM`` name (``"model.layers.3.self_attn.q_proj.weight"``) as a fresh CPU tensor in
``dtype``. :mod:`lens_attn.loading.stream` asks for a layer's tensors, folds and converts them, and
moves on, so the process never holds more than the model being built plus one layer in flight.

Why reading is done by hand: a memory-mapped file counts in the process's resident memory once its
pages are touched, so reading every tensor out of a mapping and keeping the mapping open costs the
file's size on top of the model. Safetensors are read with ``readinto`` into the tensor's own buffer
(the page cache is not the process's memory); the pickled ``.bin`` / ``.pth`` formats are memory
mapped by ``torch.load(mmap=True)`` and each tensor's pages are handed back with
``madvise(MADV_DONTNEED)`` (:func:`release_pages`) once it has been copied out.

    >>> from lens_attn.loading.hf import open_llama_directory
    >>> reader, tokenizer = open_llama_directory(lens_attn.BUNDLED_CHECKPOINT)
    >>> with reader:
    ...     reader.read("model.norm.weight", torch.float32).shape
    torch.Size([128])
"""

import ctypes
import json
import mmap
import os
import struct
import sys
from pathlib import Path

import torch
from torch import Tensor
from transformers import LlamaConfig

from lens_attn.errors import CheckpointError
from lens_attn.validation import reading_checkpoint

# safetensors dtype names -> torch (the float types a Llama checkpoint can hold)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
_MADV_DONTNEED = 4  # Linux and macOS


class CheckpointReader:
    """A checked checkpoint whose tensors are read one at a time (see the module docstring).

    Subclasses set ``config`` (checked), ``source`` (for messages) and implement :meth:`_read`.
    A tied checkpoint (``config.tie_word_embeddings``) has no ``lm_head.weight``: reading it reads
    the embedding again.
    """

    config: LlamaConfig
    source: str

    def read(self, name: str, dtype: torch.dtype) -> Tensor:
        """Tensor ``name`` (a transformers ``LlamaForCausalLM`` name), contiguous, on the CPU, in
        ``dtype``; the caller owns it (no view of a file or of another tensor)."""
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            name = "model.embed_tokens.weight"
        tensor = self._read(name, dtype)
        if tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return tensor.contiguous()

    def _read(self, name: str, dtype: torch.dtype) -> Tensor:
        raise NotImplementedError

    def close(self) -> None:
        """Close the files (a no-op by default)."""

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------
# page release for memory-mapped files


def release_pages(address: int, n_bytes: int) -> None:
    """Drop the resident pages of a read-only file mapping in ``[address, address + n_bytes)``.

    The pages stay in the kernel's page cache (a later access reads them back), but stop counting
    in this process's resident memory. Only whole pages inside the range are released; on systems
    without ``madvise`` (Windows) this does nothing.
    """
    if n_bytes <= 0 or not hasattr(os, "sysconf") or sys.platform == "win32":
        return
    page = mmap.PAGESIZE
    start = -(-address // page) * page
    end = (address + n_bytes) // page * page
    if end > start:
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


def release_tensor_pages(tensor: Tensor) -> None:
    """:func:`release_pages` for the storage of a tensor ``torch.load(..., mmap=True)`` returned."""
    storage = tensor.untyped_storage()
    release_pages(storage.data_ptr(), storage.nbytes())


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _LIBC


# --------------------------------------------------------------------------------------------------
# Hugging Face directories: safetensors and .bin shards


class HFReader(CheckpointReader):
    """The weights of a Hugging Face directory (``model.safetensors``, ``pytorch_model.bin`` or an
    index with its shards); ``config`` is the checked ``config.json``, shapes already checked."""

    def __init__(self, path: Path, config: LlamaConfig, files: list[str]) -> None:
        self.config, self.source = config, str(path)
        self._where: dict[str, Path] = {}  # tensor name -> file
        self._safetensors: dict[Path, _SafetensorsFile] = {}
        self._pickles: dict[Path, dict[str, Tensor]] = {}
        for name in files:
            file = path / name
            if file.suffix == ".safetensors":
                handle = _SafetensorsFile(file)
                self._safetensors[file] = handle
                keys = handle.entries
            else:
                with reading_checkpoint(file):
                    keys = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                self._pickles[file] = keys
            self._where |= {key: file for key in keys}

    def _read(self, name: str, dtype: torch.dtype) -> Tensor:
        file = self._where[name]
        if file in self._safetensors:
            return self._safetensors[file].read(name)
        mapped = self._pickles[file][name]
        tensor = mapped.to(dtype, copy=True)
        release_tensor_pages(mapped)
        return tensor

    def close(self) -> None:
        for handle in self._safetensors.values():
            handle.close()
        self._safetensors.clear()
        self._pickles.clear()


class _SafetensorsFile:
    """One ``.safetensors`` file: its header parsed, tensors read with ``readinto``.

    The format: an 8-byte little-endian header length, a JSON header mapping each tensor name to
    ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the data that follows), and
    an optional ``"__metadata__"``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = open(path, "rb")  # noqa: SIM115  (closed by close())
        size = os.fstat(self._handle.fileno()).st_size
        try:
            (header_len,) = struct.unpack("<Q", self._handle.read(8))
            if header_len > size - 8:
                raise ValueError(f"a {header_len}-byte header in a {size}-byte file")
            header = json.loads(self._handle.read(header_len))
        except (struct.error, ValueError) as err:
            self._handle.close()
            raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None
        header.pop("__metadata__", None)
        self.data_start, self.entries = 8 + header_len, header
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            if self.data_start + end > size:
                self._handle.close()
                raise CheckpointError(
                    f"{path} is truncated: tensor {name} needs bytes up to "
                    f"{self.data_start + end} of a {size}-byte file"
                )

    def read(self, name: str) -> Tensor:
        entry = self.entries[name]
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(
                f"{self.path}: tensor {name} has dtype {entry['dtype']}; valid: "
                f"{', '.join(_SAFETENSORS_DTYPES)}"
            )
        begin, end = entry["data_offsets"]
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        self._handle.seek(self.data_start + begin)
        if self._handle.readinto(buffer.numpy()) != end - begin:
            raise CheckpointError(f"{self.path} ended while reading tensor {name}")
        return buffer.view(dtype).reshape(entry["shape"])

    def close(self) -> None:
        self._handle.close()
