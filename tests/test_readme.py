"""The README's Quickstart is what CI runs, and ``import lens_attn`` stays light."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quickstart", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_quickstart_is_two_commands_and_ci_runs_the_test_command():
    commands = quickstart_commands()
    assert len(commands) == 2
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert commands[1] in ci.splitlines()
    assert "pytest" in commands[1]
    # with transformer-lens>=3.9,<5, pip would pick TransformerLens 4: the Quickstart pins 3.9, and
    # CI runs the suite a second time on TransformerLens 4.3.0
    assert all('"transformer-lens==3.9.0"' in command for command in commands)
    assert 'pip install "torch==2.13.0" ".[test]" "transformer-lens==4.3.0" && pytest' in ci


def test_import_is_light():
    # heavy or optional modules are imported only by the functions that need them
    code = "import sys, lens_attn; print(sorted(m for m in ('matplotlib', 'circuitsvis', 'transformer_lens', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_export_is_stable_and_not_a_module():
    # a lazy export named like a submodule would turn into the module after its first import
    import types

    import lens_attn

    for name in lens_attn.__all__:
        first = getattr(lens_attn, name)
        assert getattr(lens_attn, name) is first, name
        assert not isinstance(first, types.ModuleType), name
