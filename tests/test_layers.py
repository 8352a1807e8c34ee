"""The layer order of docs/ARCHITECTURE.md, checked on the code.

The floors come from the table in docs/ARCHITECTURE.md (its first column is the floor's number, its ``modules`` column
the files on it), so a new module only needs a row entry there. A module may import modules on its own floor or on a
higher one (a smaller number), never a lower one; and no module reaches itself through imports (no circle). Imports
are read from the source with :mod:`ast`, everywhere in a file: top-level ones, lazy ones inside functions, and
``importlib.import_module("...")`` / ``__import__("...")`` by name (an f-string name counts as every module its fixed
start can name). ``test_a_planted_upward_import_fails`` shows the check failing.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCHITECTURE = REPO / "docs" / "ARCHITECTURE.md"
ROOTS = (("lifealign_lite", REPO / "lifealign_lite"), ("lifealign_lite.cli", REPO / "cli"))
DYNAMIC = {"import_module", "__import__"}  # calls that import a module by its name


def package_modules() -> dict[str, Path]:
    """Every module of the package, cli/ included, by dotted name (``__init__`` files under their package's name)."""
    modules = {}
    for package, root in ROOTS:
        for path in sorted(root.rglob("*.py")):
            parts = [p for p in path.relative_to(root).with_suffix("").parts if p != "__init__"]
            modules[".".join([package, *parts])] = path
    return modules


def table_floors(text: str) -> dict[str, int]:
    """``{module: floor}`` from the layer table: rows ``| N | layer | `a.py`, `memory/b.py`, `cli/c.py` | ... |``."""
    floors = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].isdigit():
            continue
        for name in re.findall(r"`([\w/]+)\.py`", cells[2]):
            module = "lifealign_lite." + name.replace("/", ".")  # cli/app.py is installed as lifealign_lite.cli.app
            assert module not in floors, f"{name}.py is listed twice in the layer table"
            floors[module] = int(cells[0])
    return floors


def _dynamic_name(call: ast.Call) -> ast.expr | None:
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    return call.args[0] if name in DYNAMIC and call.args else None


def imports(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The package modules ``module`` imports anywhere in ``source`` (lazy imports and importlib by name included)."""
    parts = module.split(".")
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = parts[: len(parts) - node.level + (1 if is_package else 0)] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found |= {target} | {f"{target}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.Call) and (arg := _dynamic_name(node)) is not None:
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.add(arg.value)
            elif isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
                prefix = arg.values[0].value  # f"lifealign_lite.bench.{kind}": any module it can name
                found |= {m for m in known if m.startswith(prefix)}
    return found & known - {module}


def import_graph(sources: dict[str, str], packages: set[str]) -> dict[str, set[str]]:
    known = set(sources)
    return {m: imports(src, m, m in packages, known) for m, src in sources.items()}


def upward_imports(graph: dict[str, set[str]], floors: dict[str, int]) -> list[str]:
    """Every import of a module on a lower floor (a larger number) than the importer's, as readable lines."""
    return sorted(f"{m} (floor {floors[m]}) imports {n} (floor {floors[n]})"
                  for m, targets in graph.items() if m in floors for n in targets if n in floors and floors[n] > floors[m])


def circles(graph: dict[str, set[str]]) -> list[str]:
    """The modules that reach themselves through imports."""
    def reaches(start, goal, seen):
        return any(n == goal or (n not in seen and not seen.add(n) and reaches(n, goal, seen)) for n in graph.get(start, ()))

    return sorted(m for m in graph if reaches(m, m, set()))


def repo_sources() -> tuple[dict[str, str], set[str]]:
    modules = package_modules()
    packages = {m for m, p in modules.items() if p.name == "__init__.py"}
    return {m: p.read_text(encoding="utf-8") for m, p in modules.items()}, packages


def test_every_module_has_a_floor_in_the_architecture_table():
    floors = table_floors(ARCHITECTURE.read_text(encoding="utf-8"))
    modules = package_modules()
    packages = {m for m, p in modules.items() if p.name == "__init__.py"}
    missing = sorted(set(modules) - packages - set(floors))
    assert not missing, f"add these modules to the layer table of docs/ARCHITECTURE.md: {missing}"
    gone = sorted(set(floors) - set(modules))
    assert not gone, f"the layer table of docs/ARCHITECTURE.md lists modules that do not exist: {gone}"


def test_no_module_imports_a_lower_floor():
    sources, packages = repo_sources()
    floors = table_floors(ARCHITECTURE.read_text(encoding="utf-8"))
    assert not upward_imports(import_graph(sources, packages), floors)


def test_no_import_circle():
    """No module of the package (cli/ included) imports, directly or through others, a module that imports it
    (importlib by name included: a circle hidden behind ``import_module`` is still a circle)."""
    sources, packages = repo_sources()
    assert not circles(import_graph(sources, packages))


def test_a_planted_upward_import_fails():
    """The checks above catch what they are for: a lazy upward import, an importlib one by name, and a circle."""
    sources, packages = repo_sources()
    floors = table_floors(ARCHITECTURE.read_text(encoding="utf-8"))
    planted = dict(sources)
    planted["lifealign_lite.errors"] += "\n\ndef _later():\n    from .align import align  # lazy, inside a function\n"
    planted["lifealign_lite.files"] += "\n\nimport importlib\n_late = importlib.import_module('lifealign_lite.serve')\n"
    planted["lifealign_lite.data"] += "\n\ndef _m(kind):\n    return __import__(f'lifealign_lite.memory.{kind}')\n"
    graph = import_graph(planted, packages)
    found = upward_imports(graph, floors)
    assert any(line.startswith("lifealign_lite.errors ") and "imports lifealign_lite.align " in line for line in found), found
    assert any(line.startswith("lifealign_lite.files ") and "imports lifealign_lite.serve " in line for line in found), found
    assert any(line.startswith("lifealign_lite.data ") and "imports lifealign_lite.memory.router " in line for line in found), found
    # a circle on one floor, made by an import by name (what bench/harness.py once did to reach bench/speed.py)
    planted = dict(sources)
    planted["lifealign_lite.bench.harness"] += "\n\ndef _v():\n    import importlib\n    return importlib.import_module('lifealign_lite.bench.speed')\n"
    assert "lifealign_lite.bench.harness" in circles(import_graph(planted, packages))
    # and the real code, unplanted, passes both
    assert not upward_imports(import_graph(sources, packages), floors)


def test_the_table_reader_reads_floors_and_folders():
    text = "| floor | layer | modules | owns |\n|---|---|---|---|\n| 1 | base | `errors.py`, `memory/x.py` | a |\n| 9 | cli | `cli/app.py` | b |\n"
    assert table_floors(text) == {"lifealign_lite.errors": 1, "lifealign_lite.memory.x": 1, "lifealign_lite.cli.app": 9}
