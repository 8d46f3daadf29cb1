"""The import graph of ``src/peftkit``: no cycles, and the layers import only downwards.

Layers, bottom to top: ``core`` → ``formats`` → ``methods`` → everything else (``io``, ``train``,
``data``, ``serve``, ``merge``, ...) → ``cli``. Function-local imports count as imports.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "peftkit"

#: package → the packages (first component under peftkit) it may import
ALLOWED = {
    "core": {"core"},
    "formats": {"core", "formats"},
    "methods": {"core", "formats", "methods"},
}


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """The peftkit modules ``path`` imports (absolute names), anywhere in the file."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out: set[str] = set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node.test)
                   for stmt in node.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("peftkit"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("peftkit"):
                continue
            for a in node.names:  # `from . import x` may name a module
                sub = f"{target}.{a.name}"
                out.add(sub if _exists(sub) else target)
    return {m for m in out if m != mod}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _exists(name: str) -> bool:
    p = SRC.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PKG.rglob("*.py")}


def layer(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_layers_import_only_downwards():
    problems = []
    for mod, deps in graph().items():
        allowed = ALLOWED.get(layer(mod))
        for d in deps:
            if d == "peftkit" and mod != "peftkit":
                problems.append(f"{mod} imports the top-level package")
            elif allowed is not None and layer(d) not in allowed:
                problems.append(f"{mod} imports {d}")
            elif layer(d) == "cli" and layer(mod) != "cli":
                problems.append(f"{mod} imports the CLI ({d})")
    assert not problems, "\n".join(sorted(problems))


def test_no_import_cycles():
    # edges to a package's __init__ that only re-exports are real edges too: no exceptions
    g = {m: {d for d in deps if d != "peftkit"} for m, deps in graph().items() if m != "peftkit"}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in g:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_each_module_imports_alone():
    """Every module imports in a fresh peftkit import state (no hidden order dependence)."""
    mods = sorted(m for m in graph() if not m.endswith("__main__"))
    code = (
        "import importlib, sys, traceback\n"
        "import torch\n"
        f"mods = {mods!r}\n"
        "bad = []\n"
        "for m in mods:\n"
        "    for k in [k for k in sys.modules if k == 'peftkit' or k.startswith('peftkit.')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except ImportError as e:\n"
        "        if 'peftkit' in str(e) or 'circular' in str(e):\n"
        "            bad.append(f'{m}: {e}')\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    return env
