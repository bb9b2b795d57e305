"""How every lens-attn output file is written: atomically, and JSON strictly.

    >>> path = write_text_atomic(tmp_path / "scores.json", dumps_strict({"x": float("nan")}))
    >>> path.read_text()
    '{"x": null}'

The bytes go to a temporary file created exclusively (``tempfile.mkstemp``: ``O_EXCL``, an
unpredictable name) in the target's own folder, are flushed and fsynced, and the temporary file is
renamed over the target (``os.replace``). A reader sees the old file or the new one, never half of
one; a symlink planted at the target is replaced, not followed; the temporary file is removed if
anything fails. Run folders (locks, ``run.json``) are ``lens_attn.runs``.

JSON is strict: NaN and infinities are written as ``null`` (``allow_nan=False``), so any JSON parser
reads it; the loaders read ``null`` in a number grid back as NaN (``nan_for_null``).
"""

import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

from lens_attn.errors import InputError

TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # open_atomic's mkstemp names
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: mkstemp creates 0600 files, chmod-ed to what open() would give


@contextmanager
def open_atomic(path: "str | os.PathLike", *, text: bool = False) -> Iterator[IO]:
    """A file object whose contents replace ``path`` atomically when the block ends without error."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "w" if text else "wb", **({"encoding": "utf-8"} if text else {})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # renames over a symlink at ``path``; never follows it
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_text_atomic(path: "str | os.PathLike", text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; return ``path``."""
    with open_atomic(path, text=True) as fh:
        fh.write(text)
    return Path(path)


def write_bytes_atomic(path: "str | os.PathLike", data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; return ``path``."""
    with open_atomic(path) as fh:
        fh.write(data)
    return Path(path)


def _fsync_dir(directory: Path) -> None:
    with suppress(OSError):  # not every platform/filesystem lets a directory be fsynced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def strict_json(obj) -> object:
    """``obj`` with every NaN / infinite float replaced by ``None`` (JSON ``null``)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def dumps_strict(obj, **kwargs) -> str:
    """``json.dumps`` that writes NaN/inf as ``null`` and never emits non-standard JSON."""
    return json.dumps(strict_json(obj), allow_nan=False, **kwargs)


def nan_for_null(values):
    """A nested list of numbers read back from strict JSON, with ``None`` -> NaN."""
    if values is None:
        return math.nan
    if isinstance(values, list):
        return [nan_for_null(v) for v in values]
    return values


def save_table_and_json(directory: "str | os.PathLike", stem: str, table, payload: dict) -> Path:
    """A result's ``<stem>.csv`` (its dataframe) and ``<stem>.json`` (everything), each atomic."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(directory / f"{stem}.csv", table.to_csv(index=False))
    write_text_atomic(directory / f"{stem}.json", dumps_strict(payload, indent=1))
    return directory


def load_json(
    directory: "str | os.PathLike", stem: str, writer: str, *, required: tuple[str, ...] = ()
) -> dict:
    """``<stem>.json`` from ``directory``, checked to be a JSON object with the ``required`` keys.

    FileNotFoundError naming ``writer`` if it is missing; :class:`InputError` naming the file if it
    is not valid UTF-8 JSON, or not what ``writer.save`` writes.
    """
    path = Path(directory) / f"{stem}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; {writer}.save(directory) writes it")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path} is not a JSON file written by {writer}.save: {err}") from None
    missing = [key for key in required if not isinstance(data, dict) or key not in data]
    if missing:
        raise InputError(
            f"{path} was not written by {writer}.save: it lacks {', '.join(missing)} "
            f"(a {writer} file holds {', '.join(required)})"
        )
    return data
