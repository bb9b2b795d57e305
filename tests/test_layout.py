"""The package reads as its pipeline: no import cycle, small modules, a CLI that starts fast.

The import graph is read from the source with ``ast`` (imports inside functions count too), not from
``sys.modules``, so a cycle hidden behind a function-level import is found as well.
"""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lens_attn"
MAX_LINES = 450


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """The lens_attn modules that ``name`` imports, anywhere in its source."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in MODULES)
        elif isinstance(node, ast.ImportFrom) and node.module in MODULES:
            for alias in node.names:  # `from lens_attn.scoring import builtin` names a module
                submodule = f"{node.module}.{alias.name}"
                out.add(submodule if submodule in MODULES else node.module)
    out.discard(name)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_between_lens_attn_modules():
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    assert "lens_attn.scoring.builtin" in graph["lens_attn.scoring.runner"]  # the graph is read
    assert _cycles(graph) == []


def test_no_module_is_over_450_lines():
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_cli_help_imports_no_torch():
    code = (
        "import sys; from lens_attn.cli import build_parser; build_parser().format_help(); "
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_cli_choices_match_the_library():
    """The CLI writes some closed sets out (to import no torch); they must match the library's."""
    from typing import get_args

    from lens_attn import cli
    from lens_attn.ablation.methods import METHODS
    from lens_attn.ablation.metrics import METRICS
    from lens_attn.loading.convert import Backend
    from lens_attn.loading.hf import DTypeName

    # "patch" runs each prompt with the head outputs of a paired reference prompt: library only
    assert cli.ABLATION_METHODS == tuple(m for m in METHODS if m != "patch")
    assert cli.METRICS == METRICS
    assert cli.BACKENDS == get_args(Backend) and cli.DTYPES == get_args(DTypeName)
