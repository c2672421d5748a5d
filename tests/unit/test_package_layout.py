"""The package reads top-down: no import cycle between its modules, and no file too long to
read at once.

The import graph is drawn from every import statement of every .py under megatron_mhc/, at
module level and inside functions and classes alike: a function-level import hides a cycle from
Python, not from a reader. Its nodes are the package's modules (a package is its `__init__`,
named by the package); an edge M -> T says that M imports T:

- `import a.b.c` names module a.b.c; `from a.b import c` names module a.b.c when c is a
  submodule, else a.b (c is a name defined in a.b); relative imports are resolved against M's
  package. Imports from outside megatron_mhc are left out, and so are dynamic imports
  (`importlib.import_module` of a name held in data): they are no statements.
- Importing a.b.c first runs the `__init__` of a and of a.b, so M -> a.b.c also draws M -> a and
  M -> a.b, except for the packages that contain M (and M itself, when M is a package): Python
  has started running those before M, whatever M imports, so M's statement adds no dependency
  on them. Thus `megatron_mhc.fusions.triton.ops` importing `megatron_mhc.fusions.triton.kernels`
  depends on that module only, while `megatron_mhc.config` importing
  `megatron_mhc.fusions.backends` depends on the package `megatron_mhc.fusions` too.
- The one allowed cycle: a package P whose `__init__` imports a module S inside it (to export
  S's API) while S imports a name that P's `__init__` defines (`from P import name`), and
  nothing else: a cycle of exactly these two modules. Any longer cycle through a package's
  `__init__` is reported.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "megatron_mhc"
MAX_LINES = 500


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(root: Path) -> dict[str, dict[str, int]]:
    """{module: {imported module: line of the first statement importing it}} of the package
    at root (see the module docstring)."""
    files = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        own_package = name if is_package else name.rpartition(".")[0]
        running = {*_ancestors(name), name}  # started before this module's statements run
        edges = graph.setdefault(name, {})
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                named = [_deepest_module(a.name, files) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = own_package.split(".")
                    package = ".".join(package[: len(package) - node.level + 1])
                    base = f"{package}.{base}" if base else package
                named = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names
                ]
            else:
                continue
            for target in named:
                if target not in files:
                    continue  # outside the package
                implicit = [p for p in _ancestors(target) if p not in running]
                for imported in (*implicit, target):
                    if imported != name:
                        edges[imported] = min(edges.get(imported, node.lineno), node.lineno)
    return graph


def _deepest_module(dotted: str, files) -> str:
    """The longest prefix of dotted that is a module of the package (dotted if none is)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in files:
            return ".".join(parts[:i])
    return dotted


def _strongly_connected(graph) -> list[list[str]]:
    """Tarjan's strongly connected components of graph, iteratively."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph.get(succ, ())))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
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
                    components.append(sorted(component))
    return components


def _is_allowed(component: list[str]) -> bool:
    """A package and a module inside it, and nothing else (see the module docstring)."""
    if len(component) != 2:
        return False
    outer, inner = component  # sorted: a package sorts before the modules inside it
    return inner.startswith(outer + ".")


def _a_cycle(graph, component: list[str]) -> list[str]:
    """One cycle through the component's first module, as the modules it passes."""
    members, start = set(component), component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        node = frontier.pop(0)
        for succ in sorted(graph[node]):
            if succ == start:
                return [*paths[node], start]
            if succ in members and succ not in paths:
                paths[succ] = [*paths[node], succ]
                frontier.append(succ)
    raise AssertionError(f"no cycle through {start}")


def import_cycles(root: Path) -> list[str]:
    """Each cycle of the package's imports but the allowed one, as `a (line) -> b ...`."""
    graph = import_graph(root)
    cycles = []
    for component in _strongly_connected(graph):
        if len(component) > 1 and not _is_allowed(component):
            cycle = _a_cycle(graph, component)
            cycles.append(
                " -> ".join(
                    f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:], strict=False)
                )
                + f" -> {cycle[-1]}"
            )
    return cycles


def test_package_has_no_import_cycle():
    cycles = import_cycles(PACKAGE)
    assert not cycles, "import cycles (each edge at the line of its import):\n" + "\n".join(cycles)


def _write(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_import_graph_sees_function_level_relative_and_implicit_package_imports(tmp_path):
    package = _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            # The allowed cycle: the __init__ exports a submodule's API, which uses a name of
            # the __init__.
            "pkg/ops/__init__.py": "from pkg.ops.names import NAMES\nVERSION = 1\n",
            "pkg/ops/names.py": "from pkg.ops import VERSION\nNAMES = ()\n",
            # layer -> (implicitly) the ops package; the ops package's module -> layer, inside
            # a function and through a relative import.
            "pkg/layer.py": "import pkg.ops.names\n",
            "pkg/ops/check.py": "def f():\n    from ..layer import x\n",
        },
    )
    graph = import_graph(package)
    assert graph["pkg.layer"] == {"pkg.ops": 1, "pkg.ops.names": 1}
    assert graph["pkg.ops.check"] == {"pkg.layer": 2}
    assert import_cycles(package) == []  # the check module is imported by nobody

    # A function-level import planted in the package's __init__ closes a cycle through it.
    with (package / "ops" / "__init__.py").open("a") as init:
        init.write("\n\ndef g():\n    from pkg.ops import check\n")
    assert import_cycles(package) == [
        "pkg.layer (line 1) -> pkg.ops (line 6) -> pkg.ops.check (line 2) -> pkg.layer"
    ]


def test_no_package_file_passes_500_lines():
    counts = {
        str(path.relative_to(REPO)): len(path.read_text().splitlines())
        for path in sorted(PACKAGE.rglob("*.py"))
    }
    offenders = {path: lines for path, lines in counts.items() if lines > MAX_LINES}
    assert not offenders, f"package files over {MAX_LINES} lines (split them by job): " + ", ".join(
        f"{path} ({lines})" for path, lines in offenders.items()
    )
