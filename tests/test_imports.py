"""No import cycles among our modules: the textgen.* (and bench/) import graph is acyclic.

Every ``.py`` file under service/, training/ and bench/ is parsed with ``ast``; each ``import`` and
``from ... import`` statement (at module level, inside functions, under ``if TYPE_CHECKING``) that names one
of our modules is resolved to that module's name: relative imports against the importing module's package,
``from package import submodule`` to the submodule. Type-only imports count: a cycle through them still
tangles the layering. The test fails on every strongly connected component of more than one module (Tarjan),
printing a concrete cycle (a -> b -> c -> a) through each of its modules; the two-module case (A <-> B) is
also reported on its own.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Mapping, Set
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# directory -> the name it is imported under (bench/ holds scripts: they import each other by bare name)
PACKAGES = {"service": "textgen.service", "training": "textgen.training", "bench": "bench"}


def module_names() -> dict[str, Path]:
    """Every module of ours: dotted name -> file (a package's name -> its __init__.py)."""
    out: dict[str, Path] = {}
    for folder, prefix in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((prefix, *parts))] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ours that the module ``name`` (file ``path``) imports anywhere in its body."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    script_dir = name.startswith("bench.")  # a script's own folder is on sys.path

    def ours(target: str) -> str | None:
        if target in modules:
            return target
        if script_dir and f"bench.{target}" in modules:
            return f"bench.{target}"
        return None

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                # ``import a.b.c`` binds a and runs a.b.c: the deepest module of ours it names
                parts = alias.name.split(".")
                for k in range(len(parts), 0, -1):
                    if (m := ours(".".join(parts[:k]))) is not None:
                        found.add(m)
                        break
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = ours(f"{base}.{alias.name}")  # ``from package import submodule``
                if sub is not None:
                    found.add(sub)
                elif (m := ours(base)) is not None:
                    found.add(m)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports."""
    modules = module_names()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def mutual_pairs() -> list[tuple[str, str]]:
    graph = import_graph()
    return sorted((a, b) for a, targets in graph.items() for b in targets if a < b and a in graph[b])


Graph = Mapping[str, Set[str]]


def strongly_connected(graph: Graph) -> list[list[str]]:
    """The strongly connected components of ``graph`` (Tarjan's algorithm, iterative: no recursion limit),
    each sorted, in sorted order. Edges to nodes that are not keys of ``graph`` are ignored."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        work = [(root, iter(sorted(t for t in graph[root] if t in graph)))]  # DFS frames: node, its successors
        while work:
            node, successors = work[-1]
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(t for t in graph[nxt] if t in graph))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:  # every successor done: node is finished
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component: list[str] = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return sorted(components)


def shortest_cycle(graph: Graph, start: str) -> list[str] | None:
    """A shortest cycle through ``start`` as a path ``[start, ..., start]`` (breadth first), or None."""
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [start, *reversed(path[:-1]), start] if node != start else [start, start]
            if nxt not in parent and nxt in graph:
                parent[nxt] = node
                queue.append(nxt)
    return None


def import_cycles(graph: Graph) -> list[list[str]]:
    """One shortest cycle through each module that lies on a cycle, each written from its smallest module,
    without repeats: every strongly connected component of more than one module (or with a self-loop)
    shows up, with a concrete path for each of its modules."""
    cycles: list[list[str]] = []
    for component in strongly_connected(graph):
        if len(component) == 1 and component[0] not in graph[component[0]]:
            continue
        for module in component:
            cycle = shortest_cycle(graph, module)
            assert cycle is not None, module  # every module of a strongly connected component is on a cycle
            ring = cycle[:-1]
            first = ring.index(min(ring))
            canonical = [*ring[first:], *ring[:first], min(ring)]
            if canonical not in cycles:
                cycles.append(canonical)
    return cycles


def format_cycles(graph: Graph) -> str:
    lines = []
    for component in strongly_connected(graph):
        cycles = import_cycles({m: set(graph[m]) & set(component) for m in component})
        if cycles:
            lines.append(f"  {len(component)} modules import each other in a circle: {', '.join(component)}")
            lines += [f"    {' -> '.join(c)}" for c in cycles]
    return "\n".join(lines)


def test_the_import_graph_resolves_our_modules() -> None:
    """The resolver itself: relative, absolute, submodule and in-function imports are found."""
    modules = module_names()
    job = imports_of("textgen.service.scoring.job", modules["textgen.service.scoring.job"], modules)
    assert {"textgen.service.bundle", "textgen.service.runtime", "textgen.service.scoring.executors",
            "textgen.service.scoring.tasks", "textgen.service.vocab"} <= job
    executors = imports_of("textgen.service.scoring.executors", modules["textgen.service.scoring.executors"],
                           modules)
    assert "textgen.service.scoring.ray_executor" in executors  # imported inside make_executor
    assert "textgen.service.scoring.job" not in executors
    bench = imports_of("bench.score_throughput", modules["bench.score_throughput"], modules)
    assert {"bench._common", "textgen.service.scoring", "textgen.service.scoring.tasks"} <= bench


def test_no_two_modules_import_each_other() -> None:
    pairs = mutual_pairs()
    assert not pairs, "modules that import each other:\n" + "\n".join(f"  {a} <-> {b}" for a, b in pairs)


def test_the_cycle_finder_finds_cycles_of_any_length() -> None:
    """The cycle finder itself, on small graphs: a 3-cycle, a DAG, a 2-cycle, a self-loop, two components."""
    three = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(three) == [["a", "b", "c"], ["d"]]
    assert import_cycles(three) == [["a", "b", "c", "a"]]
    assert "a -> b -> c -> a" in format_cycles(three)
    dag = {"a": {"b", "c"}, "b": {"c", "d"}, "c": {"d"}, "d": set()}
    assert strongly_connected(dag) == [["a"], ["b"], ["c"], ["d"]]
    assert import_cycles(dag) == [] and format_cycles(dag) == ""
    assert import_cycles({"x": {"y"}, "y": {"x"}}) == [["x", "y", "x"]]
    assert import_cycles({"x": {"x"}}) == [["x", "x"]]
    # two circles sharing a module, one more apart; edges out of the graph (other packages) are ignored
    graph = {"a": {"b", "d"}, "b": {"a"}, "c": {"a", "os"}, "d": {"c"}, "e": {"f"}, "f": {"e"}, "g": {"a"}}
    assert strongly_connected(graph) == [["a", "b", "c", "d"], ["e", "f"], ["g"]]
    assert import_cycles(graph) == [["a", "b", "a"], ["a", "d", "c", "a"], ["e", "f", "e"]]
    # a long chain: no recursion limit
    chain = {f"m{i:05d}": {f"m{i + 1:05d}"} for i in range(5000)} | {"m05000": {"m00000"}}
    assert len(strongly_connected(chain)) == 1 and len(shortest_cycle(chain, "m00000") or []) == 5002


def test_our_modules_import_no_circle() -> None:
    """No cycle of any length: a -> b -> c -> a tangles the layering as much as a <-> b does."""
    graph = import_graph()
    assert not import_cycles(graph), "import cycles among our modules:\n" + format_cycles(graph)


def test_nothing_under_service_but_the_cli_imports_training() -> None:
    """The bundle contract (service/bundle.py, service/vocab.py) is imported one way: training writes bundles
    to it; the service reads them without any of training's code. Only the command line dispatches to it."""
    modules = module_names()
    offenders = sorted(
        (name, target)
        for name, path in modules.items()
        if name.startswith("textgen.service") and name != "textgen.service.cli"
        for target in imports_of(name, path, modules)
        if target.startswith("textgen.training")
    )
    assert not offenders, "service modules that import training:\n" + "\n".join(f"  {a} -> {b}" for a, b in offenders)
    # ... and the check sees such an import where there is one: the CLI's lazy training imports are found.
    cli = imports_of("textgen.service.cli", modules["textgen.service.cli"], modules)
    assert {"textgen.training.train", "textgen.training.config"} <= cli
