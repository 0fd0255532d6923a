"""The layers of DESIGN.md hold, read off the source: stores < stages < pipeline, stage 1
(stages.cache) never reaches up into stage 2 (stages.distill), no import circle among the
project's modules, and no module grows past the size a reader can hold in their head.

Every import counts, module-level or inside a function: an import deferred into a function
still makes the importing module depend on the other one (it only hides a circle until the
function runs), so a circle is a circle wherever its imports sit. Imports under
`if TYPE_CHECKING:` count too. Edges go to the module named (`from a.b import c` is `a.b.c` when
that is a module of the project, else `a.b`); importing a submodule does not add an edge to its
package's `__init__`, which Python runs first but which holds no design dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stores", "stages", "pipeline", "bench")
MAX_LINES = 450  # DESIGN.md: small modules with one job
# being split / edited elsewhere; listed here so the size rule is checked on every other module
SIZE_EXEMPT: set[str] = set()


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, for every .py under the project's packages (a package as its name)."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # `import a.b.c` of a non-module attribute path
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted: every
    import circle lies inside one of them."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:  # the graph is ~200 modules deep at most: recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


FORBIDDEN = [  # (importer package, imported package, why)
    ("stores", "stages", "stores/ is the cache format: numpy in, numpy out"),
    ("stores", "pipeline", "stores/ is the cache format: numpy in, numpy out"),
    ("stages", "pipeline", "stages/ is importable without a CLI"),
    ("stages.cache", "stages.distill", "stage 1 never depends on stage 2 (shared code goes below both, "
     "code comparing both above both)"),
    ("stages.cache", "stages.fidelity", "fidelity compares both stages: it sits above them"),
    ("stages.distill", "stages.fidelity", "fidelity compares both stages: it sits above them"),
]


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} imports {t}: {why}" for m, targets in sorted(graph.items()) for t in sorted(targets)
            for low_pkg, high_pkg, why in FORBIDDEN if _in(m, low_pkg) and _in(t, high_pkg)]


def test_layers_hold():
    assert layer_violations(import_graph()) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_modules_stay_small():
    big = {name: n for name, path in project_modules().items()
           if (n := len(path.read_text().splitlines())) > MAX_LINES and name not in SIZE_EXEMPT}
    assert big == {}, f"split these modules (> {MAX_LINES} lines): {big}"


def test_checker_finds_cycles_and_violations(tmp_path):
    """The checker itself, on a tiny tree: a deferred import closing a circle, a relative import,
    a stage-1 module importing stage 2, and a store importing stages."""
    files = {
        "stores/__init__.py": "",
        "stores/a.py": "from stages.data import x\n",
        "stages/__init__.py": "",
        "stages/data/__init__.py": "",
        "stages/data/x.py": "def f():\n    from stages.data import y\n",
        "stages/data/y.py": "from . import x\n",
        "stages/cache/__init__.py": "",
        "stages/cache/w.py": "from stages.distill.teacher import T\n",
        "stages/distill/__init__.py": "",
        "stages/distill/teacher.py": "import stages.data.x\n",
        "pipeline/__init__.py": "",
        "bench/__init__.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    graph = import_graph(tmp_path)
    assert graph["stages.data.y"] == {"stages.data.x"}
    assert graph["stages.distill.teacher"] == {"stages.data.x"}
    assert cycles(graph) == [["stages.data.x", "stages.data.y"]]
    assert layer_violations(graph) == [
        "stages.cache.w imports stages.distill.teacher: " + FORBIDDEN[3][2],
        "stores.a imports stages.data.x: " + FORBIDDEN[0][2],
    ]
