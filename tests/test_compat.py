"""``lens_attn.compat``: which TransformerLens is installed, and what ``load_model`` builds on it."""

import subprocess
import sys
from pathlib import Path

import pytest

from lens_attn import compat
from lens_attn.loading import load_model

ROOT = Path(__file__).resolve().parents[1]


def test_version_and_hooked_agree():
    # (on 4.x even hasattr(transformer_lens, "HookedTransformer") raises ImportError)
    assert compat.TL_VERSION[0] in (3, 4)
    assert compat.HAS_HOOKED == (compat.TL_VERSION < (4, 0))
    assert compat.DEFAULT_BACKEND == ("hooked" if compat.HAS_HOOKED else "bridge")


@pytest.mark.hooked_only
def test_default_backend_is_hooked_on_3_9(tiny_checkpoints):
    model = load_model(tiny_checkpoints["mha"].path, device="cpu")
    assert type(model).__name__ == "HookedTransformer" and compat.is_hooked(model)
    assert compat.can_start_at_layer(model)


@pytest.mark.tl4_only
def test_default_backend_is_the_bridge_on_4(tiny_checkpoints):
    model = load_model(tiny_checkpoints["mha"].path, device="cpu")
    assert type(model).__name__ == "TransformerBridge" and not compat.is_hooked(model)
    assert compat.can_start_at_layer(model)  # forward(start_at_layer=) exists from 4.0
    assert compat.architecture(model.cfg) == "LlamaForCausalLM"


@pytest.mark.tl4_only
def test_hooked_is_refused_with_what_to_do_on_4(tiny_checkpoints):
    with pytest.raises(
        ValueError, match="backend='hooked' needs HookedTransformer.*backend='bridge'"
    ):
        load_model(tiny_checkpoints["mha"].path, backend="hooked", device="cpu")
    assert not isinstance(object(), compat.HookedTransformer)
    with pytest.raises(ImportError, match="use load_model"):
        compat.HookedTransformer()


def test_no_module_imports_what_transformer_lens_4_removed():
    # the names TransformerLens 4 removed are imported at module level in lens_attn/compat.py only
    removed = ("import HookedTransformer", "transformer_lens.utils", "import utils",
               "loading_from_pretrained", "transformer_lens.components")  # fmt: skip
    offenders = []
    for path in [*ROOT.glob("lens_attn/**/*.py"), *ROOT.glob("tests/*.py"),
                 *ROOT.glob("experiments/*.py")]:  # fmt: skip
        if path.name in ("compat.py", "test_compat.py"):
            continue
        text = path.read_text(encoding="utf-8")
        for name in removed:
            for line in text.splitlines():
                # module level only: a lazy import behind compat.is_hooked() never runs on 4.x
                if name in line and line.startswith("from transformer_lens"):
                    offenders.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert offenders == []


def test_the_package_imports_without_hooked_transformer_when_it_is_gone(tmp_path):
    # whatever is installed, lens_attn must import and load with transformer_lens's 4.x surface:
    # make `from transformer_lens import HookedTransformer` raise as 4.x does
    shim = tmp_path / "sitecustomize.py"
    shim.write_text(
        "import transformer_lens\n"
        "def _gone(name):\n"
        "    raise ImportError(f'{name!r} was removed in TransformerLens 4.0')\n"
        "for _n in ('HookedTransformer', 'HookedTransformerConfig'):\n"
        "    if hasattr(transformer_lens, _n):\n"
        "        delattr(transformer_lens, _n)\n"
        "transformer_lens.__getattr__ = _gone\n"
    )
    code = "import lens_attn.compat as c, lens_attn.loading; print(c.HAS_HOOKED, c.DEFAULT_BACKEND)"
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["False", "bridge"]
