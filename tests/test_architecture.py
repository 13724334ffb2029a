"""The package's shape: imports go down the declared layers (import-linter), no import cycles, no private attribute
of a package object used outside the class that defines it."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "nvila_quant"


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with the repository's contract on the package found first on the path at ``root``."""
    env = {"PYTHONPATH": str(root), "PATH": str(Path(sys.executable).parent)}
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--config", str(REPO / "pyproject.toml"), "--no-cache"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_layers_contract_holds() -> None:
    result = _lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module,upward", [
    ("numerics/quantizer.py", "from nvila_quant.kernels import QuantLinear"),
    ("kernels/cpu/native.py", "import nvila_quant.model.nvila"),
    ("model/session.py", "from nvila_quant.quant import runner"),
])
def test_layers_contract_catches_an_upward_import(tmp_path: Path, module: str, upward: str) -> None:
    """The same check on a copy of the package with one import added against the layers fails, naming it."""
    shutil.copytree(PACKAGE, tmp_path / "nvila_quant", ignore=shutil.ignore_patterns("__pycache__", "data"))
    target = tmp_path / "nvila_quant" / module
    target.write_text(target.read_text() + f"\n\ndef _upward() -> None:\n    {upward}  # noqa\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0 and "0 kept, 1 broken" in result.stdout, result.stdout + result.stderr
    assert f"nvila_quant.{module.removesuffix('.py').replace('/', '.')} ->" in result.stdout


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles() -> None:
    graph = grimp.build_graph("nvila_quant", cache_dir=None)
    assert _cycles(graph) == []
    # the check itself sees a cycle when there is one
    graph.add_import(importer="nvila_quant.numerics.qtensor", imported="nvila_quant.model.nvila")
    assert any("nvila_quant.numerics.qtensor" in c for c in _cycles(graph))


def _private_names_defined_by_package_classes() -> set[str]:
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for cls in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)):
            for node in ast.walk(cls):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("_"):
                    names.add(node.name)
                elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                      and isinstance(node.value, ast.Name) and node.value.id == "self"):
                    names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.endswith("__")}


def test_private_attributes_stay_in_their_class() -> None:
    """``obj._name`` where a package class defines ``_name`` appears only as ``self._name`` / ``cls._name``."""
    private = _private_names_defined_by_package_classes()
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute) or node.attr not in private:
                continue
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
                continue
            offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert offenders == []
