"""moepipe's modules form one-way layers: a module imports only from its own layer or below.

Every import statement counts, including those inside functions (lazy imports) and
`importlib.import_module("moepipe....")` with a literal name; importing `a.b.c` also runs the
packages `a.b` and `a`, so those count as imported too. docs/ARCHITECTURE.md draws LAYERS."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "moepipe"

# Bottom to top. An entry names a module or a package (then everything under it) relative to
# `moepipe`; a module belongs to its longest matching entry.
LAYERS: list[list[str]] = [
    # read by everyone; `plugins` is the registry config validation looks names up in
    # the topology file is configuration too: validate() builds it to check it (the
    # `placement` package's __init__ imports nothing)
    ["config", "plugins", "placement", "placement.topology"],
    # the model (no process groups), data, and the pure placement vocabulary
    ["model", "data", "placement.plan", "placement.cost_model", "placement.tensor_parallel_cost",
     "placement.model_spec", "placement.workloads", "placement.forecast", "placement.shadows"],
    ["sim"],                 # discrete-event simulator over plans
    # placers score candidate plans with the simulator; the re-plan loop runs them
    ["placement.placers", "placement.replan", "placement.mesh_search", "placement.shadow_eval"],
    ["parallel"],            # process groups, stages, gradient sync, live migration
    ["train"],               # trainers, launch, checkpoints, profiling
    ["cli", "plugins.conformance"],  # applications: moepipe-sim; plug-in self-checks run placers and backends
]

# Packages whose modules sit in different layers: the entry covers the package's __init__ only,
# so a new module there must be given its layer explicitly.
INIT_ONLY = {"placement"}

# Upward edges not removed yet: (importer, imported) -> why. Keep this short.
EXCEPTIONS: dict[tuple[str, str], str] = {}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, name: str, is_package: bool) -> set[str]:
    """Absolute dotted names of every moepipe module `source` imports, anywhere in the file."""
    found: set[str] = set()
    here = name.split(".") if is_package else name.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                stem = here[: len(here) - node.level + 1]
                base = ".".join(stem + ([node.module] if node.module else []))
            found.add(base)
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            found.update(f"{base}.{a.name}" for a in node.names)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    return {m for m in found if m == PACKAGE or m.startswith(PACKAGE + ".")}


def import_graph(sources: dict[str, tuple[str, bool]], skip: frozenset = frozenset()) -> dict[str, set[str]]:
    """{module: modules it imports (and their parent packages)}, both relative to moepipe.

    `sources` maps a relative module name ("" for moepipe itself) to (source, is_package);
    `skip` holds (importer, imported) imports to leave out, parents included."""
    graph: dict[str, set[str]] = {}
    for rel, (src, is_pkg) in sources.items():
        full = f"{PACKAGE}.{rel}" if rel else PACKAGE
        deps = set()
        for dep in imported_modules(src, full, is_pkg):
            parts = dep.split(".")[1:]
            # the module and every package above it (`from m import name` also yields m.name)
            hit = [c for c in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if c in sources and c != rel]
            if hit and (rel, hit[-1]) not in skip:
                deps.update(hit)
        graph[rel] = deps
    return graph


def layer_of(module: str, layers: list[list[str]] = LAYERS) -> int | None:
    return _placed(module, layers)[0]


def _placed(module: str, layers: list[list[str]]) -> tuple[int | None, str]:
    """Index of the layer whose longest entry is `module` or a package above it; the package
    root `moepipe` itself is the bottom (every import runs it)."""
    if module == "":
        return 0, "moepipe"
    best, entry = None, ""
    for i, entries in enumerate(layers):
        for e in entries:
            if (module == e or (module.startswith(e + ".") and e not in INIT_ONLY)) and (best is None or len(e) > len(entry)):
                best, entry = i, e
    return best, entry


def upward_edges(graph: dict[str, set[str]], layers: list[list[str]] = LAYERS) -> list[str]:
    out = []
    for mod, deps in sorted(graph.items()):
        for dep in sorted(deps):
            (lm, em), (ld, ed) = _placed(mod, layers), _placed(dep, layers)
            if lm is not None and ld is not None and ld > lm:
                out.append(f"moepipe.{mod} (layer {lm}, {em}) imports moepipe.{dep} (layer {ld}, {ed})")
    return out


def package_sources() -> dict[str, tuple[str, bool]]:
    root = ROOT / PACKAGE
    return {module_name(p, root): (p.read_text(), p.name == "__init__.py") for p in sorted(root.rglob("*.py"))}


def test_every_module_has_a_layer():
    unplaced = [m for m in package_sources() if layer_of(m) is None]
    assert not unplaced, f"add these modules to a layer in tests/test_layers.py LAYERS: {unplaced}"


def test_no_import_goes_up_a_layer():
    graph = import_graph(package_sources(), skip=frozenset(EXCEPTIONS))
    bad = upward_edges(graph)
    assert not bad, "imports that go up a layer:\n" + "\n".join(bad)


def test_exceptions_are_still_needed():
    """An exception whose import is gone must leave the list, so it only ever shrinks."""
    graph = import_graph(package_sources())
    stale = [f"{m} -> {d}" for (m, d) in EXCEPTIONS if d not in graph.get(m, set())]
    assert not stale, f"remove from EXCEPTIONS (the import is gone): {stale}"
    assert all(layer_of(d) > layer_of(m) for (m, d) in EXCEPTIONS), "an exception that is not upward"


@pytest.mark.parametrize("source", [
    "def f():\n    from moepipe.sim import simulate\n",           # lazy, inside a function
    "import moepipe.sim.engine\n",
    "from moepipe import sim\n",
    "from ..sim import engine\n",                                    # relative
    "import importlib\nimportlib.import_module('moepipe.sim')\n",
])
def test_checker_finds_an_upward_import(source):
    """The check itself: a bottom-layer module reaching the simulator in any spelling is named."""
    sources = {"": ("", True), "sim": ("", True), "sim.engine": ("", False), "placement": ("", True),
               "placement.plan": (source, False)}
    bad = upward_edges(import_graph(sources))
    assert bad and all(b.startswith("moepipe.placement.plan (layer 1") and "imports moepipe.sim" in b for b in bad)


def test_a_parent_package_counts_as_imported():
    """Importing placement.plan runs placement/__init__.py: an upper-layer import there would be
    pulled into every module below, so the package is an edge of its own."""
    sources = {"": ("", True), "placement": ("from moepipe.placement.placers import make_placement\n", True),
               "placement.plan": ("", False), "placement.placers": ("", True), "model": ("import moepipe.placement.plan\n", True)}
    graph = import_graph(sources)
    assert graph["model"] == {"placement", "placement.plan"}
    assert upward_edges(graph) == ["moepipe.placement (layer 0, placement) imports moepipe.placement.placers "
                                   "(layer 3, placement.placers)"]
