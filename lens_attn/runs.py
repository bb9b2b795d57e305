"""Run folders: one command's outputs, locked while written, ``run.json`` last.

    >>> with RunFolder(tmp_path / "demo") as run:              # validated and locked here
    ...     model = lens_attn.load_model()                    # ... before the compute starts
    ...     path = run.write_text("labels.csv", "layer,head,unit,labels\\n")
    ...     path = run.complete(run_info(model, None, {}))      # run.json, written last
    >>> sorted(p.name for p in (tmp_path / "demo").iterdir())
    ['labels.csv', 'run.json']

Every file is written through ``lens_attn.files`` (atomic, strict JSON).

The run-folder contract (:class:`RunFolder`):

* ``run.json`` is the completion marker. It is removed first when a run starts and written last,
  listing the files the run wrote (``files``); a folder without ``run.json`` holds an incomplete run.
* While a run writes, the folder is locked: ``.lens-attn.lock`` is created with ``O_EXCL``, holds the
  writer's pid and is ``flock``-ed. A second run into the folder is refused; the lock of a process
  that died (even by SIGKILL) is taken over.
* A folder that holds a previous run (``run.json`` or any file a run writes) is refused unless
  ``overwrite=True`` (``--overwrite``), which first removes the previous run's outputs: ``run.json``
  first, then the files its ``files`` lists and the known outputs (:data:`RUN_OUTPUTS`), and
  ``figures/``. Other files in the folder are left alone. A folder never mixes two runs.
"""

import errno
import fcntl
import json
import os
import shutil
from contextlib import suppress
from pathlib import Path

from lens_attn.errors import InputError
from lens_attn.files import TEMP_NAME, dumps_strict, write_bytes_atomic, write_text_atomic

RUN_JSON = "run.json"
LOCK_FILE = ".lens-attn.lock"
# What lens-attn's commands write into a run folder (discover, scores, ablate): files, then folders.
RUN_OUTPUTS = ("scores.csv", "scores.json", "labels.csv", "ablation.csv", "report.html", RUN_JSON)
# Folders: None means the whole folder is the run's (figures/); else only the files named in it.
RUN_FOLDERS: dict[str, tuple[str, ...] | None] = {
    "figures": None,
    "ablation": ("ablation.csv", "ablation.json"),
}


# --------------------------------------------------------------------------------------- run.json


def run_info(model, source, timings: dict, /, **extra) -> dict:
    """What ``run.json`` records of a command's run: the model, the versions, timings, ``extra``."""
    import torch

    import lens_attn
    from lens_attn.probes import bos_info

    cfg = model.cfg
    fields = ("n_layers", "n_heads", "n_key_value_heads", "d_model", "d_head", "d_mlp", "d_vocab",
              "n_ctx")  # fmt: skip
    return {
        "model_source": str(source) if source is not None else "bundled",
        "model_name": getattr(cfg, "model_name", None),
        "config": {k: getattr(cfg, k, None) for k in fields},
        "dtype": str(cfg.dtype),
        "device": str(cfg.device),
        "backend": type(model).__name__,
        "tokenizer": bos_info(model),  # which token is BOS, from the tokenizer
        **extra,
        "versions": {
            "lens_attn": lens_attn.__version__,
            "transformer_lens": _version("transformer-lens"),
            "torch": torch.__version__,
        },
        "timings_s": timings,
    }


def write_run_json(out: "str | os.PathLike", info: dict) -> Path:
    """Write ``out/run.json`` (strict JSON; values JSON cannot hold are written as strings)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(out / RUN_JSON, dumps_strict(info, indent=1, default=str))


def _version(dist_name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist_name)
    except PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------ run folders


def check_out_dir(out: "str | os.PathLike", *, option: str = "--out") -> Path:
    """``out`` as a Path if it is (or can be created as) a writable folder; else InputError.

    Nothing is created. Refused: an existing file, a path under a file, a folder (or the nearest
    existing parent) that this process cannot write.
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"{option} {out} is a file, not a folder; give a folder path")
    existing = out
    while not existing.exists():
        if existing.is_symlink():
            raise InputError(f"{option} {out}: {existing} is a broken symlink")
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{option} {out} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "folder" if existing == out else f"parent folder {existing}"
        raise InputError(f"{option} {out}: the {what} is not writable (permission denied)")
    return out


class RunFolder:
    """A locked run folder for one run's outputs (see the module docstring for the contract).

    ``with RunFolder(out, overwrite=False) as run:`` validates ``out``, creates it, takes the lock,
    refuses (or, with ``overwrite``, clears) a previous run, and removes ``run.json``. Inside,
    write with :meth:`write_text` / :meth:`write_bytes` or :meth:`path` (which records a file another
    writer will create), and finish with :meth:`complete`, which writes ``run.json`` last. Leaving
    the block by an exception leaves the folder without ``run.json``: incomplete. The lock is released
    either way.
    """

    def __init__(self, out: "str | os.PathLike", *, overwrite: bool = False, option: str = "--out"):
        self.out = check_out_dir(out, option=option)
        self.overwrite = overwrite
        self.option = option
        self.files: list[Path] = []  # relative to out, in the order written
        self.completed = False
        self._lock_fd: int | None = None
        self._stale_files: list[str] = []  # what a killed run had written, from its lock file

    # ----------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> "RunFolder":
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InputError(
                f"{self.option} {self.out} cannot be created: {err.strerror}"
            ) from None
        self._lock()
        try:
            self._clear_previous()
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._unlock()

    def path(self, name: "str | os.PathLike") -> Path:
        """``out / name``, recorded as an output of this run (its folder is created)."""
        relative = Path(name)
        if relative.is_absolute() or ".." in relative.parts:
            raise InputError(f"run file {name!r} must be a relative path inside {self.out}")
        target = self.out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if relative not in self.files:
            self.files.append(relative)
            if self._lock_fd is not None:  # journalled, so a killed run's files are known
                os.write(self._lock_fd, f"{relative}\n".encode())
        return target

    def write_text(self, name: "str | os.PathLike", text: str) -> Path:
        return write_text_atomic(self.path(name), text)

    def write_bytes(self, name: "str | os.PathLike", data: bytes) -> Path:
        return write_bytes_atomic(self.path(name), data)

    def record(self, *names: "str | os.PathLike") -> None:
        """Record files another writer (``HeadScores.save(run.out)``) put in the folder."""
        for name in names:
            self.path(name)

    def complete(self, info: dict) -> Path:
        """Write ``run.json`` (``info`` plus ``files``), the marker that this run finished."""
        if self._lock_fd is None:
            raise RuntimeError("RunFolder.complete() called outside its with-block")
        files = [str(p) for p in self.files if p != Path(RUN_JSON)] + [RUN_JSON]
        path = write_run_json(self.out, {**info, "files": files})
        self.files.append(Path(RUN_JSON))
        self.completed = True
        return path

    # ---------------------------------------------------------------------------------- lock

    def _lock(self) -> None:
        lock = self.out / LOCK_FILE
        for _ in range(20):  # retried only when another process swaps the lock file under us
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            except FileExistsError:
                try:
                    fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
                except FileNotFoundError:
                    continue  # released meanwhile: try to create it again
                except OSError as err:
                    raise InputError(
                        f"{self.option} {self.out}: cannot open {lock}: {err}"
                    ) from None
            except PermissionError:
                raise InputError(
                    f"{self.option} {self.out} is not writable (cannot create {LOCK_FILE})"
                ) from None
            if not self._flock(fd, lock):
                holder = _read_pid(fd)
                os.close(fd)
                raise InputError(
                    f"{self.option} {self.out} is in use by another lens-attn run "
                    f"(pid {holder or 'unknown'}, lock file {lock}); wait for it to finish or "
                    "choose another folder"
                )
            if not _same_file(fd, lock):  # the holder released (unlinked) it before we locked
                os.close(fd)
                continue
            # ours: a lock left by a dead process is taken over by rewriting the pid
            self._stale_files = _read_lock(fd)[1]
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.fsync(fd)
            self._lock_fd = fd
            return
        raise InputError(f"{self.option} {self.out}: could not take the lock {lock}; try again")

    @staticmethod
    def _flock(fd: int, lock: Path) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as err:  # a filesystem without flock: fall back to the pid's liveness
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            holder = _read_pid(fd)
            return holder is None or holder == os.getpid() or not _alive(holder)

    def _unlock(self) -> None:
        if self._lock_fd is None:
            return
        with suppress(FileNotFoundError):
            os.unlink(self.out / LOCK_FILE)  # unlinked while still locked, then released
        os.close(self._lock_fd)
        self._lock_fd = None

    # ------------------------------------------------------------------------ previous run

    def previous_outputs(self) -> list[Path]:
        """What a previous run left here: the files its run.json lists and the known outputs."""
        found: list[Path] = []
        listed: list[str] = []
        run_json = self.out / RUN_JSON
        if run_json.is_file():
            found.append(run_json)
            with suppress(OSError, UnicodeDecodeError, ValueError):
                files = json.loads(run_json.read_text(encoding="utf-8")).get("files", [])
                listed = [f for f in files if isinstance(f, str)]
        inside = [f"{d}/{f}" for d, names in RUN_FOLDERS.items() for f in names or ()]
        whole = [d for d, names in RUN_FOLDERS.items() if names is None]
        for name in (*RUN_OUTPUTS, *listed, *self._stale_files, *inside, *whole):
            relative = Path(name)
            if relative.is_absolute() or ".." in relative.parts or not relative.parts:
                continue  # a run.json listing paths outside the folder: never followed
            candidate = self.out / relative
            if candidate.parent.resolve() != self.out.resolve() / relative.parent:
                continue  # under a symlinked folder: it may point anywhere, never followed
            if (candidate.exists() or candidate.is_symlink()) and candidate not in found:
                found.append(candidate)
        return found

    def _clear_previous(self) -> None:
        for directory in (self.out, *(self.out / d for d in RUN_FOLDERS)):
            for stray in directory.glob(".*.tmp") if directory.is_dir() else ():
                if TEMP_NAME.match(stray.name) and not stray.is_dir():
                    stray.unlink(missing_ok=True)  # left by a writer killed mid-write
        previous = self.previous_outputs()
        if not previous:
            return
        if not self.overwrite:
            names = ", ".join(str(p.relative_to(self.out)) for p in previous[:5])
            raise InputError(
                f"{self.option} {self.out} holds a previous run ({names}); pass --overwrite "
                "(overwrite=True) to replace it, or choose another folder"
            )
        # run.json first: from here on the folder reads as incomplete until this run completes
        for path in sorted(previous, key=lambda p: p.name != RUN_JSON):
            if path.is_dir() and not path.is_symlink():
                if path.parent == self.out and RUN_FOLDERS.get(path.name, ()) is None:
                    shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
                _remove_empty_parents(path.parent, self.out)


def _remove_empty_parents(directory: Path, top: Path) -> None:
    while directory != top and top in directory.parents:
        try:
            directory.rmdir()
        except OSError:
            return
        directory = directory.parent


def _read_lock(fd: int) -> tuple[int | None, list[str]]:
    """The pid in a lock file and the files its run wrote (one per line after the pid)."""
    try:
        lines = os.pread(fd, 1 << 20, 0).decode("utf-8", "replace").splitlines()
    except OSError:
        return None, []
    try:
        pid = int(lines[0])
    except (IndexError, ValueError):
        pid = None
    return pid, [line for line in lines[1:] if line]


def _read_pid(fd: int) -> int | None:
    return _read_lock(fd)[0]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)
