"""The code base's own rules, checked: the linter passes, and the library's layers import only downward.

`hmoe_jax`'s subpackages are layers, each importing only from itself and the layers before it, in the
order the pipeline's data flows (README, "Architecture"); no module imports another in a cycle, not
even from inside a function.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("runtime", "formulas", "domains", "kernels", "model", "checkpoint", "data", "hybrid", "training",
          "evaluation")


def test_ruff_finds_nothing():
    ruff = pytest.importorskip("ruff")  # the `dev` extra pins it
    del ruff
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every `hmoe_jax` module a file imports, at the top or inside a function."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("hmoe_jax")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("hmoe_jax"):
                modules = {f"{target}.{alias.name}" for alias in node.names}
                found |= {m for m in modules if _exists(m)} or {target}
    return found


def _exists(module: str) -> bool:
    path = REPO.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _library() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted((REPO / "hmoe_jax").rglob("*.py"))}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_subpackage_is_a_layer():
    packages = {p.name for p in (REPO / "hmoe_jax").iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(LAYERS)
    loose = [p.name for p in (REPO / "hmoe_jax").glob("*.py") if p.name != "__init__.py"]
    assert loose == [], f"modules outside every layer: {loose}"


def test_no_module_imports_a_later_layer():
    offences = []
    for module, imported in _library().items():
        layer = _layer(module)
        if layer is None:  # the package's own __init__: the public facade
            continue
        offences += [f"{module} imports {target}" for target in imported
                     if _layer(target) is not None and _layer(target) > layer]
    assert offences == []


def test_no_import_cycle():
    library = _library()
    graph = {m: {t for t in imported if t in library and t != m} for m, imported in library.items()}
    # A package's __init__ re-exporting its modules is not a cycle with them.
    graph = {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in graph.items()}
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in graph[node]:
            if state.get(target) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(target):] + [target]))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node)
