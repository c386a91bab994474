"""The package's shape: no import cycles, no library module importing a CLI or script, and the
speed-trick transform imported by nobody below it (the model never knows it exists)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "gpt"
CLIS = {"generate", "train_ddp", "quantize", "scripts"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports in functions count too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from gpt import quant` imports the module gpt.quant
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_no_import_cycles_in_the_package():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_library_module_imports_a_cli_or_a_script():
    for path in PKG.rglob("*.py"):
        bad = {m for m in _imports(path) if m.split(".")[0] in CLIS}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_the_model_side_never_imports_the_speed_tricks():
    """Transforms act from outside: removing gpt/fast.py must leave the model, the attention
    variants, the quantised layers and checkpoints working."""
    graph = _graph()
    for name in graph:
        if name.startswith(("gpt.model", "gpt.attention", "gpt.quant", "gpt.checkpoint", "gpt.kv_cache")):
            assert "gpt.fast" not in graph[name], f"{name} imports gpt.fast"
            assert "gpt.tp" not in graph[name], f"{name} imports gpt.tp (tensor parallelism acts from outside)"


def test_no_sys_path_edits():
    files = [*ROOT.glob("*.py"), *(ROOT / "scripts").rglob("*.py"), *PKG.rglob("*.py"), *(ROOT / "tests").rglob("*.py")]
    for path in files:
        if path.resolve() == Path(__file__).resolve():
            continue
        assert "sys.path.insert" not in path.read_text(), f"{path.relative_to(ROOT)} edits sys.path"


def test_documents_stand_on_the_repository_alone():
    """No document cites a file outside the repository (a reader has only the repo)."""
    for path in [ROOT / "README.md", ROOT / "PERF-NOTES.md", *(ROOT / "docs").glob("*.md")]:
        text = path.read_text()
        for outside in ("../shared", "MEASURED.md"):
            assert outside not in text, f"{path.relative_to(ROOT)} cites {outside}"
