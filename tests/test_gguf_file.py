"""lens_attn.loading.gguf_file: the struct reader against the gguf package's own GGUFReader.

Files are written by ``gguf.GGUFWriter`` with every metadata value type (scalars, strings, arrays
of numbers, of strings and of arrays), a non-default alignment and tensors of several types; both
readers read them, and every field, tensor name, shape, type and dequantized value must agree.
"""

import gguf
import numpy as np
import pytest

from lens_attn.loading.gguf_file import GGUFFormatError, NotGGUFError, read_gguf_file

FIELDS = {
    "t.u8": (7, gguf.GGUFValueType.UINT8),
    "t.i8": (-7, gguf.GGUFValueType.INT8),
    "t.u16": (60000, gguf.GGUFValueType.UINT16),
    "t.i16": (-30000, gguf.GGUFValueType.INT16),
    "t.u32": (4_000_000_000, gguf.GGUFValueType.UINT32),
    "t.i32": (-2_000_000_000, gguf.GGUFValueType.INT32),
    "t.u64": (2**63 + 5, gguf.GGUFValueType.UINT64),
    "t.i64": (-(2**62), gguf.GGUFValueType.INT64),
    "t.f32": (0.25, gguf.GGUFValueType.FLOAT32),
    "t.f64": (1e-300, gguf.GGUFValueType.FLOAT64),
    "t.bool": (True, gguf.GGUFValueType.BOOL),
    "t.str": ("héllo ▁wörld", gguf.GGUFValueType.STRING),
}


def _write(path, alignment: int) -> None:
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("general.alignment", alignment)
    for key, (value, kind) in FIELDS.items():
        writer.add_key_value(key, value, kind)
    writer.add_array("t.ints", [3, -1, 4, 1, -5])
    writer.add_array("t.floats", [0.5, 1.5, -2.0])
    writer.add_array("t.strings", ["<s>", "</s>", "▁a", ""])
    writer.add_array("t.nested", [[1, 2], [3]])
    writer.add_tensor("f32.weight", rng.standard_normal((3, 5)).astype(np.float32))
    writer.add_tensor("f16.weight", rng.standard_normal((4, 6)).astype(np.float16))
    q8 = gguf.quantize(
        rng.standard_normal((2, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0
    )
    writer.add_tensor("q8.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("alignment", (32, 64))
def test_reads_what_gguf_reader_reads(tmp_path, alignment):
    path = tmp_path / "t.gguf"
    _write(path, alignment)
    ours, theirs = read_gguf_file(path), gguf.GGUFReader(str(path))

    # GGUFReader's contents() flattens arrays of arrays; that one is checked against what was written
    expected = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert ours.fields.pop("t.nested") == [[1, 2], [3]] and expected.pop("t.nested") == [1, 2, 3]
    assert ours.fields == expected
    assert ours.fields["t.str"] == "héllo ▁wörld" and ours.fields["t.u64"] == 2**63 + 5
    assert ours.version == int(theirs.fields["GGUF.version"].contents())
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, ref in zip(ours.tensors, theirs.tensors, strict=True):
        assert mine.shape == tuple(int(d) for d in ref.shape)
        assert mine.tensor_type == ref.tensor_type
        np.testing.assert_array_equal(
            gguf.dequantize(mine.data, mine.tensor_type).ravel(),
            gguf.dequantize(ref.data, ref.tensor_type).ravel(),
        )


def test_damaged_files_raise_format_errors(tmp_path):
    path = tmp_path / "t.gguf"
    _write(path, 32)
    data = path.read_bytes()
    cases = {  # name: (content, error type, message)
        "empty": (b"", NotGGUFError, r"it starts with b'', not b'GGUF'"),
        "magic": (b"GGML" + data[4:], NotGGUFError, r"starts with b'GGML'"),
        "version": (
            data[:4] + (9).to_bytes(4, "little") + data[8:],
            GGUFFormatError,
            r"GGUF version 9 \(valid: 2, 3",
        ),
        "header": (data[:100], GGUFFormatError, "the header ends early"),
        "data": (data[:-40], GGUFFormatError, r"tensor q8.weight needs bytes"),
    }
    for content, error, message in cases.values():
        path.write_bytes(content)
        with pytest.raises(error, match=message) as raised:
            read_gguf_file(path)
        assert (raised.type is NotGGUFError) == (
            error is NotGGUFError
        )  # truncation is not "not GGUF"
