"""The layout of DESIGN.md (docs: architecture) holds in the code: each package imports only
the layers its row allows, ``compute/`` alone knows Ray and Dask, and ``core/`` pulls in no
Prefect, Ray or Dask when imported. The imports are read from the source (function-level
imports included), so an arrow against the table fails here, not in review."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OURS = {"flows", "tasks", "compute", "serving", "monitoring", "core", "devstack"}
MAY_IMPORT = {
    "flows": {"tasks", "core"},
    "tasks": {"compute", "core", "serving", "monitoring"},
    "compute": {"core"},
    "serving": {"core"},
    "monitoring": {"core"},
    "core": set(),
    "devstack": OURS,
}
# One module of a layer a row does not allow: the service's client, so that `flows.deploy
# status` answers without a flow run, and so without Prefect (issue 20).
MAY_IMPORT_MODULE = {"flows": {"serving.control"}}
RAY_AND_DASK = {"ray", "dask", "distributed"}
MAY_KNOW_RAY = {"compute", "devstack"}


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module) of every import in the file, nested ones included."""
    return [(line, name.split(".")[0]) for line, name in full_imports(path)]


def full_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def files(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_each_package_imports_only_the_layers_its_row_allows(package):
    wrong = []
    for path in files(package):
        rel = path.relative_to(REPO).as_posix()
        for line, name in full_imports(path):
            module = name.split(".")[0]
            if (module in OURS and module != package and module not in MAY_IMPORT[package]
                    and name not in MAY_IMPORT_MODULE.get(package, ())):
                wrong.append(f"{rel}:{line} imports {module}")
            if module in RAY_AND_DASK and not (package in MAY_KNOW_RAY or rel in MAY_KNOW_RAY):
                wrong.append(f"{rel}:{line} imports {module} (compute/ alone knows Ray and Dask)")
    assert not wrong, "\n".join(wrong)


def test_nothing_imports_the_developer_tooling():
    wrong = [f"{path.relative_to(REPO)}:{line}" for package in sorted(OURS - {"devstack"})
             for path in files(package) for line, module in imports(path) if module == "devstack"]
    assert not wrong, wrong


def test_importing_core_pulls_in_no_prefect_ray_or_dask():
    modules = [path.relative_to(REPO).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
               for path in files("core")]
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted({n.split('.')[0] for n in sys.modules} & {'prefect', 'ray', 'dask', 'distributed'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_every_library_error_derives_from_one_base():
    """A command prints the message of any of them without a traceback (core.errors)."""
    import importlib
    import inspect

    from core.errors import FlywheelError

    loose = []
    for package in ("core", "tasks", "compute", "serving", "monitoring"):
        for path in files(package):
            if "class " not in path.read_text() or "Error(" not in path.read_text():
                continue
            module = importlib.import_module(path.relative_to(REPO).with_suffix("").as_posix().replace("/", ".")
                                             .removesuffix(".__init__"))
            for name, value in vars(module).items():
                if (inspect.isclass(value) and issubclass(value, Exception) and value.__module__ == module.__name__
                        and not issubclass(value, FlywheelError)):
                    loose.append(f"{module.__name__}.{name}")
    assert not loose, loose
