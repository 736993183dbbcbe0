"""The package's structure, checked from its source: imports point one way (no cycles, type-only
imports included), no part reads another object's private state, and only the life-cycle kinds
branch on the kind (everything else asks the kind)."""

from __future__ import annotations

import ast
from pathlib import Path

import hybridkv

SRC = Path(hybridkv.__file__).parent
KINDS = {"Full", "Sliding", "Chunked", "Ssm", "Encoder", "Windowed"}


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return out


MODULES = _modules()


def _imports(name: str, tree: ast.Module) -> set[str]:
    """Modules of the package that ``name`` imports anywhere (top level, functions, and
    ``if TYPE_CHECKING`` blocks alike): ``from a.b import c`` is ``a.b.c`` when that is a module."""
    out = set()
    package = name if (SRC / Path(*name.split(".")[1:]) / "__init__.py").exists() else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return {m for m in out if m in MODULES and m != name}


def test_no_import_cycles() -> None:
    graph = {name: _imports(name, tree) for name, tree in MODULES.items()}
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(node):], node]))
        if node in done:
            return
        for dep in sorted(graph[node]):
            visit(dep, [*path, node])
        done.add(node)

    for name in graph:
        visit(name, [])
    assert len(done) == len(MODULES) > 60


STDLIB_TYPES = {"argparse._SubParsersAction"}  # annotations naming the standard library's classes


def test_no_private_access_across_objects() -> None:
    """``x._name`` only for ``x`` = ``self`` or ``cls`` (dunders aside)."""
    bad = []
    for name, tree in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value.id if isinstance(node.value, ast.Name) else None
                if owner not in {"self", "cls"} and ast.unparse(node) not in STDLIB_TYPES:
                    bad.append(f"{name}:{node.lineno} {ast.unparse(node)}")
    assert bad == []


def test_only_the_kinds_branch_on_the_kind() -> None:
    """Outside ``hybridkv.lifecycles`` nothing tests which kind a life cycle is: no
    ``isinstance`` against a kind class, no ``type(...)`` comparison, no kind flags."""
    bad = []
    for name, tree in MODULES.items():
        if name.startswith("hybridkv.lifecycles"):
            continue
        for node in ast.walk(tree):
            called = node.func.id if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) else None
            if called in {"isinstance", "type"}:
                names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
                if names & KINDS:
                    bad.append(f"{name}:{node.lineno} {ast.unparse(node)}")
            if isinstance(node, ast.Attribute) and node.attr in {"is_ssm", "is_full", "kind_name"}:
                bad.append(f"{name}:{node.lineno} {ast.unparse(node)}")
    assert bad == []


# Folders bottom-up (docs/ARCHITECTURE.md's layer table): a module imports only its own folder
# and folders listed before it. Only the reference engine is pinned here so far: everything may
# sit below it, and only the CLI above it.
RUNTIME_ABOVE = {"core", "lifecycles", "layouts", "planning", "storage", "reuse", "manager", "engine",
                 "scheduler", "sim"}


def test_the_runtime_sits_above_the_scheduler_and_below_the_cli() -> None:
    graph = {name: _imports(name, tree) for name, tree in MODULES.items()}
    folder = {name: [*name.split("."), ""][1] for name in MODULES}
    into_runtime = sorted(f"{n} -> {d}" for n, deps in graph.items() for d in deps
                          if folder[d] == "runtime" and folder[n] not in {"runtime", "cli"})
    out_of_runtime = sorted(f"{n} -> {d}" for n, deps in graph.items() for d in deps
                            if folder[n] == "runtime" and folder[d] not in RUNTIME_ABOVE | {"runtime", ""})
    assert into_runtime == [] and out_of_runtime == []
    assert any(folder[d] == "scheduler" for d in graph["hybridkv.runtime.engine"])
