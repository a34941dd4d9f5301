"""The package as installed: one top-level name, no import cycles, the layering, a light
``import hodlr`` and a public namespace without stray names.

``fenwick/`` and ``kernels/`` sit at the top of the repository but ship as ``hodlr.fenwick``
and ``hodlr.kernels``: the names ``fenwick`` and ``kernels`` belong to other published
packages, which must stay importable beside hodlr.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

import hodlr

PACKAGE = pathlib.Path(hodlr.__file__).resolve().parent
HEAVY = ("scipy", "sympy", "hypothesis", "matplotlib", "torch", "triton")


def _python(code: str, env=None, cwd=None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that imports the hodlr under test."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE.parent)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd)


# -- the import graph ------------------------------------------------------------------------
def package_modules() -> dict:
    """``{module name: path}`` of every module of the installed package (``hodlr.fenwick`` and
    ``hodlr.kernels`` included: their directories are reached through ``hodlr/``)."""
    out = {}
    for folder, dirs, files in os.walk(PACKAGE, followlinks=True):
        dirs[:] = sorted(d for d in dirs if (pathlib.Path(folder) / d / "__init__.py").exists())
        parts = ("hodlr",) + pathlib.Path(folder).relative_to(PACKAGE).parts
        for name in sorted(files):
            if name.endswith(".py"):
                module = parts if name == "__init__.py" else parts + (name[:-3],)
                out[".".join(module)] = pathlib.Path(folder) / name
    return out


def imports_of(name: str, path: pathlib.Path, modules) -> set:
    """The hodlr modules ``name`` imports explicitly, at module level or inside functions
    (``import a.b``, ``from a import b``, relative imports, ``importlib.import_module("a.b")``).
    ``from package import module`` counts as importing the module, not the package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()

    def add(target):
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                add(full if full in modules else base)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            add(node.args[0].value)
    return out


@functools.lru_cache(maxsize=1)
def import_graph() -> dict:
    modules = package_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict):
    """One cycle of ``graph`` as a list of modules (first == last), or ``None``."""
    state = {}
    stack = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_sees_every_module_and_function_level_imports():
    graph = import_graph()
    for name in ("hodlr", "hodlr._formulas", "hodlr.mask", "hodlr.backends", "hodlr.backends.dense",
                 "hodlr.fenwick", "hodlr.fenwick.scan", "hodlr.kernels", "hodlr.kernels._layout"):
        assert name in graph, name
    assert {"hodlr.sparse", "hodlr.tree", "hodlr.display", "hodlr._formulas"} <= graph["hodlr.mask"]
    assert "hodlr.fenwick" in graph["hodlr.kernels._layout"]  # from hodlr import fenwick
    assert "hodlr.kernels.states" in graph["hodlr.kernels.attention"]  # from . import states
    assert "hodlr.kernels" in graph["hodlr.backends.triton"]  # inside a function
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layering():
    """hodlr.fenwick imports nothing else of hodlr; hodlr.kernels only hodlr.fenwick; the shared
    formulas sit below the modules that use them."""
    graph = import_graph()
    for name, targets in graph.items():
        if name == "hodlr.fenwick" or name.startswith("hodlr.fenwick."):
            assert all(t.startswith("hodlr.fenwick") for t in targets), (name, targets)
        if name == "hodlr.kernels" or name.startswith("hodlr.kernels."):
            assert all(t.startswith(("hodlr.kernels", "hodlr.fenwick")) for t in targets), (name, targets)
    for low in ("hodlr._formulas", "hodlr._accuracy", "hodlr.errors", "hodlr.options"):
        assert graph[low] <= {"hodlr.fenwick", "hodlr.fenwick.arrays", "hodlr.errors", "hodlr.options"}, low
    for name in ("hodlr.sparse", "hodlr.tree", "hodlr.display", "hodlr.plotting"):
        assert "hodlr.mask" not in graph[name], name


# -- what import hodlr costs ------------------------------------------------------------------
def test_import_hodlr_is_light():
    """``import hodlr`` brings numpy and nothing of scipy, sympy, hypothesis, matplotlib, torch,
    triton; neither does the command line until a command needs them (``show`` does not)."""
    out = _python(f"""
        import sys
        import hodlr
        after_import = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
        import hodlr.cli
        assert hodlr.cli.main(["show", "5"]) == 0
        after_cli = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
        print("numpy" in sys.modules, after_import, after_cli, "hodlr.testing" in sys.modules)
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "True [] [] False", out.stdout


def test_public_namespace():
    """``dir(hodlr)`` lists the public names and dunders only (no ``annotations``,
    ``importlib``, nor the modules hodlr is built from), and every public name resolves."""
    names = [n for n in dir(hodlr) if not (n.startswith("__") and n.endswith("__"))]
    assert sorted(names) == sorted(hodlr.__all__)
    assert all(not n.startswith("_") for n in names)
    for stray in ("annotations", "importlib"):
        assert not hasattr(hodlr, stray), stray
    for name in hodlr.__all__:
        assert getattr(hodlr, name) is not None, name
    assert hodlr.kernels.__name__ == "hodlr.kernels" and hodlr.fenwick.__name__ == "hodlr.fenwick"


# -- the names fenwick and kernels belong to others ------------------------------------------
def test_standin_fenwick_and_kernels_stay_importable_beside_hodlr(tmp_path):
    """Stand-in ``kernels`` and ``fenwick`` packages first on ``sys.path``: hodlr imports and
    computes with its own (every backend, the Triton kernels included where they run), and
    ``import kernels`` / ``import fenwick`` still give the stand-ins."""
    for name in ("kernels", "fenwick"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"MARKER = 'stand-in {name}'\n")
    env = dict(os.environ)
    if importlib.util.find_spec("torch") is not None:
        import torch

        if not torch.cuda.is_available():
            env["TRITON_INTERPRET"] = "1"
    out = _python(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import numpy as np
        import hodlr
        from hodlr.fenwick import level
        T = 6
        M = hodlr.LogLinearMask(np.ones((T, hodlr.num_levels(T))))
        x = np.arange(T, dtype=float)[:, None]
        ran = []
        for name, entry in hodlr.backend_info().items():
            for where in ("numpy", "torch_cpu"):
                if entry["ops"]["matmul"][where] is not True:
                    continue
                if where == "torch_cpu":
                    import torch
                    mask, operand = hodlr.LogLinearMask(torch.ones(T, hodlr.num_levels(T), dtype=torch.float64)), torch.from_numpy(x)
                else:
                    mask, operand = M, x
                y = hodlr.matmul(mask, operand, backend=name)
                o = hodlr.attention(operand, operand, operand, mask, backend=name)
                assert np.allclose(np.asarray(y).ravel(), np.cumsum(np.arange(T))), name
                assert np.allclose(np.asarray(o).ravel(), np.arange(T) * np.cumsum(np.arange(T) ** 2)), name
                ran.append(name)
        assert level(5, 3) == 3 and hodlr.fenwick.level(6, 4) == 2
        import fenwick, kernels
        assert fenwick.MARKER == "stand-in fenwick" and kernels.MARKER == "stand-in kernels"
        assert sys.modules["hodlr.fenwick"] is not fenwick
        assert hodlr.__file__.startswith({str(PACKAGE)!r}), hodlr.__file__
        own = sorted(m for m in sys.modules if m.startswith(("hodlr.kernels", "hodlr.fenwick")))
        print(sorted(set(ran)), "hodlr.kernels" in sys.modules, own[:2])
    """, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    ran = out.stdout.splitlines()[-1]
    for name in ("dense", "sparse", "recursive", "fenwick"):
        assert repr(name) in ran, ran
    if env.get("TRITON_INTERPRET") == "1":
        assert "'triton'" in ran and "True" in ran, ran


def test_distribution_has_one_top_level_module(tmp_path):
    """A wheel built from the source tree installs the top-level name ``hodlr`` and nothing
    else; ``fenwick`` and ``kernels`` are inside it."""
    root = PACKAGE.parent
    if not (root / "pyproject.toml").exists():
        pytest.skip("hodlr is not imported from a source checkout: there is nothing to build")
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed: cannot build a wheel offline")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(root / name, src / name)
    for name in ("hodlr", "fenwick", "kernels"):
        shutil.copytree(root / name, src / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = (tmp_path / "dist").glob("hodlr-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"hodlr"}, top
    for inside in ("hodlr/fenwick/index.py", "hodlr/fenwick/scan.py", "hodlr/kernels/attention.py",
                   "hodlr/kernels/_layout.py", "hodlr/backends/triton.py", "hodlr/_formulas.py", "hodlr/nn/mamba2.py"):
        assert inside in names, inside
    missing = [m for m, path in package_modules().items()
               if "/".join(m.split(".")) + ("/__init__.py" if path.name == "__init__.py" else ".py") not in names]
    assert not missing, f"modules left out of the wheel (pyproject's packages): {missing}"
    (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")] or [None]
    if top_level is not None:
        assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["hodlr"]
