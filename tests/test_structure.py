"""The package's shape: imports flow one way (no cycle, nothing imports a layer above it, not even inside a
function), and no module grows past a size a newcomer reads in one sitting."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "mmla"

# Bottom to top. A module may import modules of its own layer or below, never above.
LAYERS = [
    {"__init__", "tasks", "config", "errors", "stats"},
    {"data", "prompts", "evaluation", "runs", "paper", "decode"},
    {"video", "audio", "models", "resolve", "compare", "plots"},
    {"llava_video", "prefetch"},
    {"tiny", "inputs"},
    {"backends"},
    {"engine", "backends.local", "backends.openai"},
    {"finetune", "distributed"},
    {"inference", "multilora"},
    {"training"},
    {"experiment", "ablation"},
    {"report", "report_stats", "export"},
    {"demo"},
    {"cli"},
]


def _name(path: Path) -> str:
    """A module's name under mmla: "engine", "backends" (a package's __init__), "backends.local"."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, mods: set[str]) -> set[str]:
    """mmla modules imported anywhere in the file (top level or inside functions)."""
    here = path.relative_to(SRC).parts[:-1]  # the package a relative import starts from

    def known(name: str) -> str:  # "backends.local.x" -> "backends.local"; "inputs.Row" -> "inputs"
        parts = name.split(".")
        while parts and ".".join(parts) not in mods:
            parts.pop()
        return ".".join(parts)

    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(here[: len(here) - (node.level - 1)])
            elif node.module and node.module.split(".")[0] == "mmla":
                base = []
            else:
                continue
            module = node.module.split(".") if node.module else []
            if module and module[0] == "mmla" and not node.level:
                module = module[1:]
            target = base + module
            for a in node.names:
                found.add(known(".".join(target + [a.name])) or known(".".join(target)) or "__init__")
        elif isinstance(node, ast.Import):
            found.update(known(a.name[5:]) for a in node.names if a.name.startswith("mmla."))
    return found - {""}


def _graph() -> dict[str, set[str]]:
    files = [p for p in SRC.rglob("*.py")]
    mods = {_name(p) for p in files}
    return {_name(p): _imports(p, mods) - {_name(p)} for p in files}


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
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 650}
    assert not long, long
