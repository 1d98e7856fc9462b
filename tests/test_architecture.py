"""The layers of docs/architecture.md hold: import-linter's contracts (pyproject.toml), no import
cycle between modules (imports inside functions included), no module over 800 lines, and the
kernels import without dask."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

import chunkglm

PACKAGE = Path(chunkglm.__file__).resolve().parent
ROOT = PACKAGE.parent
MAX_LINES = 800


def test_import_linter_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "broken" in done.stdout and " 0 broken" in done.stdout  # it really checked contracts


def _cycles(graph, modules):
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    edges = {m: sorted(d for d in graph.find_modules_directly_imported_by(m) if d in modules)
             for m in modules}
    for root in sorted(modules):
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
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
                        out.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter[0]
                counter[0] += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(edges[child])))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return out


def test_no_import_cycle_between_modules():
    graph = grimp.build_graph("chunkglm")
    modules = {m for m in graph.modules if m.startswith("chunkglm")}
    # a package's __init__ re-exporting its own submodules is not a cycle of design
    cycles = [c for c in _cycles(graph, modules)
              if not all(m == c[0] or m.startswith(c[0] + ".") for m in c)]
    assert not cycles, f"import cycles: {cycles}"


def test_cycle_finder_finds_a_cycle():
    class Graph:
        imports = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}

        def find_modules_directly_imported_by(self, module):
            return self.imports[module]

    assert _cycles(Graph(), {"a", "b", "c", "d"}) == [["a", "b", "c"]]


def test_no_module_over_800_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert not {p: n for p, n in sizes.items() if n > MAX_LINES}


def test_kernels_import_without_dask_xarray_or_zarr():
    code = ("import sys, pkgutil, importlib, chunkglm.kernels as k\n"
            "for m in pkgutil.walk_packages(k.__path__, 'chunkglm.kernels.'): importlib.import_module(m.name)\n"
            "print(sorted(n for n in ('dask', 'distributed', 'xarray', 'zarr') if n in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
