"""The package's shape: imports flow one way (no cycle, nothing imports a layer above it, not even inside a
function), and no module grows past a size a newcomer reads in one sitting."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "mmla"

# Bottom to top. A module may import modules of its own layer or below, never above.
LAYERS = [
    {"__init__", "tasks", "config", "errors"},
    {"data", "prompts", "evaluation", "runs", "paper"},
    {"video", "audio", "models"},
    {"tiny", "inputs"},
    {"engine", "openai_backend"},
    {"trainer", "distributed"},
    {"inference", "training"},
    {"multilora"},
    {"experiment", "ablation"},
    {"report", "export"},
    {"demo"},
    {"cli"},
]


def _imports(path: Path) -> set[str]:
    """mmla modules imported anywhere in the file (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from . import x / from .x import y
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(a.name for a in node.names)
            elif node.module and node.module.split(".")[0] == "mmla":
                parts = node.module.split(".")
                found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("mmla."))
    return found


def _graph() -> dict[str, set[str]]:
    mods = {p.stem for p in SRC.glob("*.py")}
    return {p.stem: _imports(p) & mods - {p.stem} for p in SRC.glob("*.py")}


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_imports_flow_down_the_layers():
    layer = {m: i for i, group in enumerate(LAYERS) for m in group}
    graph = _graph()
    unplaced = sorted(set(graph) - set(layer))
    assert not unplaced, f"place these modules in LAYERS: {unplaced}"
    upward = [f"{m} ({layer[m]}) imports {n} ({layer[n]})" for m, deps in graph.items() for n in deps
              if layer[n] > layer[m]]
    assert not upward, upward


def test_modules_stay_readable():
    long = {p.name: n for p in SRC.glob("*.py") if (n := len(p.read_text().splitlines())) > 650}
    assert not long, long
