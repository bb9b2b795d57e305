"""A GGUF file's metadata and tensor table, read with ``struct``; the tensors as raw memory-mapped bytes.

On SmolLM2-135M-Instruct's Q4_1 file, ``f = read_gguf_file(path)`` gives
``f.fields["llama.block_count"] == 30``, a 49152-entry ``f.fields["tokenizer.ggml.tokens"]``, and
``f.tensors[0]`` named ``token_embd.weight`` of shape ``(576, 49152)`` (GGML order, fastest
dimension first) and type ``Q8_0``, whose ``gguf.dequantize(t.data, t.tensor_type)`` is flat:
reshape it to ``(49152, 576)``.

The layout (GGUF versions 2 and 3, little-endian): ``GGUF``, version ``u32``, tensor and key counts
``u64``; each key a string (``u64`` length, UTF-8) with a ``u32`` value type and its value (arrays:
element type ``u32``, count ``u64``, elements); each tensor's name, ``u32`` dimension count, ``u64``
dimensions (fastest first), ``u32`` GGML type and ``u64`` offset into the data section, which starts
at the next multiple of ``general.alignment`` (32 by default).

The gguf package's ``GGUFReader`` reads the same file by building a numpy view per value, so a
49k-token vocabulary and its merges take it 3.7-5.9 s (SmolLM2-135M, one CPU thread); this reads
them with ``struct.unpack_from`` in 0.06 s. Dequantizing stays with the gguf package
(``gguf.dequantize``). Anything that does not parse raises ``GGUFFormatError``; a file that is not
GGUF at all (wrong magic) its subclass ``NotGGUFError``.
"""

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types (gguf.GGUFValueType) -> struct format; 8 is a string, 9 an array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}  # fmt: skip
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    """The bytes are not a complete GGUF file of a version this reader knows."""


class NotGGUFError(GGUFFormatError):
    """The file does not start with the GGUF magic: it is some other kind of file."""


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the file: ``data`` is its raw bytes (``uint8``, a view of the memory map)."""

    name: str
    shape: tuple[int, ...]  # GGML order: the fastest-varying dimension first
    tensor_type: Any  # gguf.GGMLQuantizationType
    data: np.ndarray


@dataclass(frozen=True)
class GGUFFile:
    """``fields``: every metadata key with its value (arrays as lists); ``tensors`` in file order."""

    version: int
    fields: dict[str, Any]
    tensors: list[GGUFTensor]


def read_gguf_file(path: str | Path) -> GGUFFile:
    """The metadata and tensor table of the GGUF file at ``path`` (tensor bytes memory-mapped)."""
    import gguf

    with open(path, "rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
        if magic != GGUF_MAGIC:
            raise NotGGUFError(f"it starts with {magic!r}, not {GGUF_MAGIC!r}")
        size = handle.seek(0, 2)
        buf = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    reader = _Reader(buf)
    reader.pos = len(GGUF_MAGIC)
    try:
        version = reader.scalar(4)
        if version not in VERSIONS:
            raise GGUFFormatError(
                f"GGUF version {version} (valid: {', '.join(map(str, VERSIONS))}; a big-endian "
                "file reads as a huge version)"
            )
        n_tensors, n_fields = reader.scalar(10), reader.scalar(10)
        fields = {}
        for _ in range(n_fields):
            key = reader.string()
            fields[key] = reader.value(reader.scalar(4))
        table = []
        for _ in range(n_tensors):
            name = reader.string()
            shape = tuple(reader.scalar(10) for _ in range(reader.scalar(4)))
            table.append((name, shape, reader.scalar(4), reader.scalar(10)))
    except struct.error:
        raise GGUFFormatError(f"the header ends early, at byte {reader.pos} of {size}") from None

    alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFFormatError(f"general.alignment is {alignment!r}; valid: a power of two")
    start = -(-reader.pos // alignment) * alignment
    data = np.frombuffer(buf, dtype=np.uint8)
    tensors = []
    for name, shape, type_id, offset in table:
        try:
            qtype = gguf.GGMLQuantizationType(type_id)
        except ValueError:
            raise GGUFFormatError(f"tensor {name} has an unknown GGML type {type_id}") from None
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n_bytes = int(np.prod(shape, dtype=np.int64)) // block_size * type_size
        first = start + offset
        if first + n_bytes > size:
            raise GGUFFormatError(
                f"tensor {name} needs bytes {first}..{first + n_bytes} of a {size}-byte file"
            )
        tensors.append(GGUFTensor(name, shape, qtype, data[first : first + n_bytes]))
    return GGUFFile(version, fields, tensors)


class _Reader:
    """Values at ``pos`` in ``buf``, little-endian, advancing ``pos``."""

    def __init__(self, buf) -> None:
        self.buf, self.pos = buf, 0

    def scalar(self, type_id: int):
        fmt = _SCALARS[type_id]
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar(10)
        if self.pos + n > len(self.buf):
            raise struct.error("string past the end")
        text = self.buf[self.pos : self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return text

    def value(self, type_id: int):
        if type_id == _STRING:
            return self.string()
        if type_id == _ARRAY:
            item, count = self.scalar(4), self.scalar(10)
            if item == _STRING:
                return [self.string() for _ in range(count)]
            if item in _SCALARS:  # one unpack for the whole array
                fmt = f"<{count}{_SCALARS[item][1]}"
                values = list(struct.unpack_from(fmt, self.buf, self.pos))
                self.pos += struct.calcsize(fmt)
                return values
            return [self.value(item) for _ in range(count)]  # arrays of arrays
        if type_id not in _SCALARS:
            raise GGUFFormatError(f"unknown metadata value type {type_id} at byte {self.pos}")
        return self.scalar(type_id)
