"""Every code example in a lens_attn docstring runs, on the bundled checkpoint, with its printed output.

Each module's doctests get one namespace: ``lens_attn``, ``torch``, ``model`` (the bundled tiny
Llama 2, loaded once), ``tmp_path`` (a fresh directory) and the module's own globals.
"""

import doctest
import importlib
import pkgutil

import pytest
import torch

import lens_attn

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(lens_attn.__path__, prefix="lens_attn.")
    if info.name != "lens_attn.__main__"
)


@pytest.fixture(scope="module")
def bundled():
    return lens_attn.load_model(device="cpu")


def _examples(module_name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(module_name)
    return [t for t in doctest.DocTestFinder().find(module) if t.examples]


def test_the_modules_with_examples_are_found():
    with_examples = [name for name in MODULES if _examples(name)]
    assert "lens_attn.scoring.runner" in with_examples and len(with_examples) >= 10


# modules whose examples run HookedTransformer-only code (skipped on TransformerLens 4)
HOOKED_ONLY = {"lens_attn.scoring.chunked"}


@pytest.mark.slow
@pytest.mark.parametrize(
    "module_name",
    [
        pytest.param(m, marks=pytest.mark.hooked_only) if m in HOOKED_ONLY else m
        for m in MODULES
        if _examples(m)
    ],
)
def test_docstring_examples_run(module_name, bundled, tmp_path):
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    for test in _examples(module_name):
        test.globs.update(lens_attn=lens_attn, torch=torch, model=bundled, tmp_path=tmp_path)
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} of {results.attempted} examples failed"
