"""Imports run one way: a package imports only the packages below it (fare_core/__init__.py)."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: Bottom to top; task_configs (the lm-eval YAML + utils) belongs to the task layer.
ORDER = ["fare_core", "fare_tasks", "fare_compression", "fare_models", "fare_analysis", "fare_pipeline", "fare_sweep"]
LAYER_OF = {**{p: i for i, p in enumerate(ORDER)}, "task_configs": ORDER.index("fare_tasks")}


def imported_packages(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            yield node.lineno, name.split(".")[0]


def test_no_package_imports_a_package_above_it():
    upward = []
    for pkg, layer in LAYER_OF.items():
        files = sorted((REPO / pkg).rglob("*.py"))
        assert files, pkg
        for path in files:
            for line, top in imported_packages(path):
                if top in ORDER and ORDER.index(top) > layer:
                    upward.append(f"{path.relative_to(REPO)}:{line} imports {top}")
    assert upward == []


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from fare_pipeline.run import run\n")
    assert ("fare_pipeline" in {top for _, top in imported_packages(bad)})
