"""The package layout shows the architecture: subpackages in layers, each importing only from the
layers below it, and no import cycle between modules (imports inside functions included)."""

import ast
import os

from conftest import REPO

PACKAGE = os.path.join(REPO, "flamingo_dist")
# lowest first; a module may import from its own layer and the ones before it
LAYERS = ["config", "data", "models", "hf", "demo", "distributed", "eval", "training", "train"]


def modules() -> dict[str, str]:
    """{dotted module name: file path} of the package."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """{module: modules of the package it imports}, from every import statement anywhere in it."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import mod` imports pkg.mod when that is a module
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                           for a in node.names]
            else:
                continue
            deps.update(t for t in targets if t.startswith("flamingo_dist.") and t in mods and t != name)
        graph[name] = deps
    return graph


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 else -1  # the package's __init__: below all


def test_every_module_belongs_to_a_layer():
    assert all(layer(m) >= 0 for m in modules() if m != "flamingo_dist"), sorted(modules())


def test_no_module_imports_from_a_higher_layer():
    upward = [f"{m} -> {d}" for m, deps in import_graph().items() for d in deps if layer(d) > layer(m)]
    assert not upward, "imports from a higher layer:\n  " + "\n  ".join(sorted(upward))


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 on the path, 2 done
    cycles = []

    def visit(m, path):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def test_the_layer_check_sees_imports_inside_functions(tmp_path):
    """The graph includes function-level imports (the ones that hid the old circles)."""
    graph = import_graph()
    assert "flamingo_dist.training.trainer" in graph["flamingo_dist.train"]  # imported inside main()


def test_the_readme_layout_names_every_subpackage_in_layer_order():
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    block = text[text.index("## Layout"):text.index("## Design")]
    entries = [line.split()[0] for line in block.splitlines() if line.startswith("  ") and line[2] != " "]
    named = [e for e in entries if e.rstrip("/") in LAYERS[:-1] + ["train.py"]]
    assert [n.rstrip("/").removesuffix(".py") for n in named] == LAYERS, named
