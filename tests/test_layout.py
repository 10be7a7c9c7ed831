"""The layout rules of docs/architecture.md that no other test holds: benchmarks import from the project, never
from tests/ (what both need, such as random-weight models, lives in trapedge.export.random_models)."""

from __future__ import annotations

import ast
from pathlib import Path

from paths import REPO, TESTS

BENCHMARKS = REPO / "benchmarks"
# The shared test modules by name, and every module tests/ holds (a benchmark puts benchmarks/ on sys.path, so
# a bare `import cards` would only work with tests/ there too).
TEST_MODULES = {"tests", "modelfolder", "fixtures_models", "cards", "conftest", "badinput", "paths"}
TEST_MODULES |= {p.stem for p in TESTS.glob("*.py")}


def _imports_of_tests(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [f"line {node.lineno}: import {n}" for n in names if n.split(".")[0] in TEST_MODULES]
    return found


def _sys_path_to_tests(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("insert", "append") and ast.unparse(node.func.value) == "sys.path"
                and "tests" in ast.unparse(node)):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_benchmarks_never_import_from_tests() -> None:
    scripts = sorted(BENCHMARKS.glob("*.py"))
    assert scripts, f"no benchmarks found in {BENCHMARKS}"
    offences = []
    for path in scripts:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        offences += [f"{path.relative_to(REPO)} {what}" for what in _imports_of_tests(tree) + _sys_path_to_tests(tree)]
    assert not offences, "benchmarks import from tests/ (move the helper into the project):\n" + "\n".join(offences)


def test_the_check_catches_an_import_from_tests() -> None:
    tree = ast.parse("import sys\nsys.path.insert(0, str(HERE.parent / 'tests'))\nfrom modelfolder import build\n"
                     "import cards\nfrom trapedge.export.random_models import build_speciesnet_folder\n")
    assert [line.split(":")[0] for line in _imports_of_tests(tree)] == ["line 3", "line 4"]
    assert [line.split(":")[0] for line in _sys_path_to_tests(tree)] == ["line 2"]


ROOMS = ("card", "speciesnet", "models", "reclassify", "outputs")  # the data's way; a room imports only earlier ones


def _runtime_imports(path: Path) -> list[str]:
    """Absolute trapedge.runtime modules a runtime file imports (TYPE_CHECKING blocks left out)."""
    tree = ast.parse(path.read_text())
    package = ".".join(["trapedge", "runtime", *path.relative_to(RUNTIME).parent.parts])
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.startswith("trapedge.runtime"):
                found.append(module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("trapedge.runtime")]
    return found


RUNTIME = Path(__file__).parents[1] / "runtime"


def test_rooms_import_only_rooms_earlier_in_the_data_flow() -> None:
    for room in ROOMS:
        allowed = set(ROOMS[: ROOMS.index(room) + 1])
        for path in (RUNTIME / room).rglob("*.py"):
            for module in _runtime_imports(path):
                parts = module.split(".")
                target = parts[2] if len(parts) > 2 else ""
                if target in ROOMS:
                    assert target in allowed, f"{path.relative_to(RUNTIME)} imports {module}"
                else:
                    assert target in ("", "atomic", "faults", "timing"), f"{path.relative_to(RUNTIME)} imports {module}"


def test_pass_one_and_the_helpers_never_reach_up_to_the_station_or_the_cli() -> None:
    for name in ("pipeline.py", "timing.py", "atomic.py", "faults.py", "bench.py", "demo.py"):
        modules = _runtime_imports(RUNTIME / name)
        assert not any(m.split(".")[2] in ("station", "cli") for m in modules if m.count(".") >= 2), name
