"""No two of our modules import each other: the textgen.* (and bench/) import graph has no two-module circle.

Every ``.py`` file under service/, training/ and bench/ is parsed with ``ast``; each ``import`` and
``from ... import`` statement (at module level, inside functions, under ``if TYPE_CHECKING``) that names one
of our modules is resolved to that module's name: relative imports against the importing module's package,
``from package import submodule`` to the submodule. The test fails on every pair A -> B, B -> A.
"""

from __future__ import annotations

import ast
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


def mutual_pairs() -> list[tuple[str, str]]:
    modules = module_names()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    return sorted((a, b) for a, targets in graph.items() for b in targets if a < b and a in graph[b])


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
