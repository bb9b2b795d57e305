"""Run folders and result files: the one place that writes them.

Every file lens-attn writes goes through ``atomic_path``: the content is written to a temporary
file created exclusively (``tempfile.mkstemp``, an unpredictable name) in the target's own folder
and then renamed over the target, so a reader sees the old file or the new one, never half of one,
and nothing is written through a link planted at a predictable name.

``run.json`` is what a command records of its run (``run_info``): the model, the versions, the
timings. It is written last, so its presence means the run folder is complete.
"""

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


@contextmanager
def atomic_path(path: "str | os.PathLike") -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; renamed to ``path`` on success.

    The folder is created if needed. On an exception the temporary file is removed and ``path`` is
    left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: "str | os.PathLike", content: "str | bytes") -> Path:
    """Write ``content`` (text as UTF-8) to ``path`` atomically (see ``atomic_path``)."""
    with atomic_path(path) as tmp:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content, encoding="utf-8")
    return Path(path)


def save_table_and_json(directory: "str | os.PathLike", stem: str, table, payload: dict) -> Path:
    """A result's ``<stem>.csv`` (its dataframe) and ``<stem>.json`` (everything), each atomic."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / f"{stem}.csv", table.to_csv(index=False))
    write_atomic(directory / f"{stem}.json", json.dumps(payload, indent=1, allow_nan=True))
    return directory


def load_json(directory: "str | os.PathLike", stem: str, writer: str) -> dict:
    """``<stem>.json`` from ``directory``; FileNotFoundError naming ``writer`` if it is missing."""
    path = Path(directory) / f"{stem}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; {writer}.save(directory) writes it")
    return json.loads(path.read_text(encoding="utf-8"))


def run_info(model, source, timings: dict, /, **extra) -> dict:
    """What ``run.json`` records of a command's run: the model, the versions, timings, ``extra``."""
    import lens_attn

    cfg = model.cfg
    fields = ("n_layers", "n_heads", "n_key_value_heads", "d_model", "d_head", "d_mlp", "d_vocab",
              "n_ctx")  # fmt: skip
    return {
        "model_source": source if source is not None else "bundled",
        "model_name": getattr(cfg, "model_name", None),
        "config": {k: getattr(cfg, k, None) for k in fields},
        "dtype": str(cfg.dtype),
        "device": str(cfg.device),
        "backend": type(model).__name__,
        **extra,
        "versions": {
            "lens_attn": lens_attn.__version__,
            "transformer_lens": _version("transformer-lens"),
            "torch": torch.__version__,
        },
        "timings_s": timings,
    }


def write_run_json(out: Path, info: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "run.json", json.dumps(info, indent=1, default=str))


def _version(dist_name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist_name)
    except PackageNotFoundError:
        return None
