"""Every import inside `src/lcmkit` points down the layer order below, with no cycles and no private names.

This is the one place the layer order is written down (docs/architecture.md draws it). A module may import its own
layer and the layers before it, never a later one, whether at the top of the file, inside a function (a lazy import
to keep `import lcmkit` cheap) or under `TYPE_CHECKING`. Modules that import each other in a cycle fail even within
one layer, and `from lcmkit.x import _name` across modules fails: a private helper another module needs is public
in a lower module instead.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lcmkit

PACKAGE = Path(lcmkit.__file__).parent

# Lowest first. A module belongs to the longest prefix that names it.
#   the package root (version, lazy public names), io (leaf helpers: model-file errors, weight files, pages, pixels),
#   control (ControlNet control images made with numpy and Pillow; the kind -> model table)
#   config (typed configs), runtime (FastPaths)
#   nn (layers), schedulers (noise schedules, the LCM and DDIM steps, sample_lcm), models (UNet, VAEs, text, safety)
#   loading (folders, single files, LoRA, textual inversion, the hub)
#   accel (OpenVINO stand-ins for the UNet and the VAE decoder: below the pipelines, so a FastPaths backend may pick them)
#   pipelines (the two LCM pipelines) and presets (their sampler settings), request (one request for every front end), tiny (the demo model)
#   spec (the model options of the CLI and the server), train, then the front ends: server, distributed (Ray Data
#   batches and Ray Serve around the server), cli
LAYERS: tuple[tuple[str, ...], ...] = (
    ("lcmkit", "lcmkit.io", "lcmkit.control"),
    ("lcmkit.config", "lcmkit.runtime"),
    ("lcmkit.nn",),
    ("lcmkit.schedulers",),
    ("lcmkit.models",),
    ("lcmkit.loading",),
    ("lcmkit.accel",),
    ("lcmkit.pipelines", "lcmkit.presets"),
    ("lcmkit.request", "lcmkit.tiny"),
    ("lcmkit.spec", "lcmkit.train"),
    ("lcmkit.server",),
    ("lcmkit.distributed",),
    ("lcmkit.cli", "lcmkit.__main__"),
)


def module_name(path: Path) -> str:
    parts = ("lcmkit", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best, level = -1, None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), index
    if level is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS")
    return level


def imports_of(path: Path, module: str) -> list[tuple[str, list[str], int]]:
    """(imported lcmkit module, imported names, line) for every import statement in the file, wherever it is."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, target] if target else base)
            found.append((target, [alias.name for alias in node.names], node.lineno))
    return [(t, names, line) for t, names, line in found if t == "lcmkit" or t.startswith("lcmkit.")]


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(target: str, names: list[str], modules: dict[str, Path]) -> list[str]:
    """The modules an import reaches: `from lcmkit.nn import resnet` reaches `lcmkit.nn.resnet` (a package's
    submodule, not the package's own names); `from lcmkit.nn import Attention` reaches `lcmkit.nn`."""
    submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
    return submodules if names and len(submodules) == len(names) else [target, *submodules]


def edges() -> dict[str, set[str]]:
    modules = all_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for target, names, _ in imports_of(path, module):
            graph[module].update(t for t in resolve(target, names, modules) if t in modules and t != module)
    return graph


def test_every_module_is_in_a_layer():
    for module in all_modules():
        layer_of(module)


def test_imports_point_down_the_layer_order():
    upward = []
    for module, path in all_modules().items():
        level = layer_of(module)
        for target, _, line in imports_of(path, module):
            if layer_of(target) > level:
                upward.append(f"{path.relative_to(PACKAGE)}:{line} {module} imports {target}")
    assert not upward, "imports that point up the layer order:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = edges()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt in graph[node] and state.get(nxt) == 1:
                # a package importing its own submodules (re-exports) is not a cycle through its parent
                cycle = [*trail[trail.index(nxt) :], nxt]
                if not all(b.startswith(a + ".") for a, b in zip(cycle, cycle[1:], strict=False)):
                    cycles.append(" -> ".join(cycle))
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_private_names_imported_across_modules():
    private = []
    for module, path in all_modules().items():
        for target, names, line in imports_of(path, module):
            hidden = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if hidden and target != module:
                private.append(f"{path.relative_to(PACKAGE)}:{line} imports {hidden} from {target}")
    assert not private, "private names imported from other modules:\n" + "\n".join(private)


@pytest.mark.parametrize(
    ("module", "target", "allowed"),
    [
        ("lcmkit.nn.conv", "lcmkit.loading.paging", False),
        ("lcmkit.models.safety", "lcmkit.pipelines.image", False),
        ("lcmkit.loading.folders", "lcmkit.models.unet", True),
        ("lcmkit.pipelines.common", "lcmkit.io.paging", True),
    ],
)
def test_the_order_itself(module, target, allowed):
    """The check can fail: a layer importing a later one is refused, the other way round accepted."""
    assert (layer_of(target) <= layer_of(module)) is allowed
