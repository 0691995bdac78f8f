"""The package's layout as the README states it: every import (also those inside functions)
points down the layers below, nothing imports in a circle, the core never imports the tools,
and the README's layout section lists exactly the modules that exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "cmd_ray"
README = PACKAGE.parent / "README.md"


def _package(name: str) -> list[str]:
    """A plug-in package and every module in it, found on disk: a new method or data set is
    one new module there, with no edit here."""
    return [name, *sorted(f"{name}.{p.stem}" for p in (PACKAGE / name).glob("*.py") if p.stem != "__init__")]


# Bottom first. A module may import from its own layer or any layer below, never above.
LAYERS = [
    ["__init__", "errors", "console", "metrics", "storage", "ray_internals"],  # leaves: no cmd-ray import
    _package("datasets"),  # built-in data sets, one module each
    ["catalogue", "images"],  # names: data sets, noise types, models; decoding a user's images
    ["knowledge"],  # pure maths (torch)
    _package("methods"),  # one module per method; torch-free until a loss is computed
    ["sections"],  # the config's sections other than the methods' (its noise section is the noise spec)
    ["config"],  # the validated settings
    ["presets"],  # YAML files, --set overrides, ${ENV} references, absolute paths
    ["noise", "labels_file", "user_data", "identity"],  # label noise, its files; a user's images; what a run is
    ["grid", "models", "batches", "data"],  # a sweep's points; networks; batches; the Parquet cache
    ["peer"],  # one peer's step
    ["summary", "exchange"],
    ["trainer"],  # the shared epoch loop, in-process trainer
    ["cluster"],  # joining or starting Ray, what it can place
    ["ray_train"],  # Ray Train
    ["results"],  # the results table and the tables computed from it, no Ray
    ["report"],  # what `cmd-ray report` prints and draws
    ["validation"],  # choosing settings on the noisy validation split
    ["wandb_runs", "stopping", "sweep"],  # Ray Tune; how a sweep stops
    ["tools", "tools.bench", "tools.load", "tools.gpu_check"],  # outside the core: only the command line imports them
    ["commands"],  # what each sub-command does
    ["cli"],  # the front door (`cmd-ray ...`): arguments, exit statuses
]
RANK = {module: rank for rank, layer in enumerate(LAYERS) for module in layer}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The cmd-ray modules `path` imports at run time (type-checking-only imports left out)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cmd_ray"):
            base = node.module.removeprefix("cmd_ray").lstrip(".")
            for alias in node.names:
                inner = f"{base}.{alias.name}" if base else alias.name
                found.add(inner if inner in modules else base)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("cmd_ray.") for a in node.names if a.name.startswith("cmd_ray."))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {module or "__init__" for module in found} - {_module_name(path)}


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(paths)) for name, path in paths.items()}


def test_every_module_has_a_layer():
    assert sorted(set(_graph()) - set(RANK)) == [], "add new modules to LAYERS (and to the README's layout)"
    assert sorted(set(RANK) - set(_graph())) == []


def test_every_import_points_down_the_layers():
    upward = [
        f"{importer} -> {imported}"
        for importer, targets in sorted(_graph().items())
        for imported in sorted(targets)
        if RANK[imported] > RANK[importer]
    ]
    assert upward == []


def test_no_import_cycle():
    graph, state, cycles = _graph(), {}, []

    def walk(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(trail[trail.index(target) :] + [module, target]))
            elif target not in state:
                walk(target, trail + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            walk(module, [])
    assert cycles == []


def test_the_core_never_imports_the_tools():
    tools = {m for m in RANK if m.split(".")[0] == "tools"}
    importers = {m for m, targets in _graph().items() if m not in tools and targets & tools}
    assert importers == {"commands"}  # `cmd-ray bench ...`, when it runs


def test_the_readme_layout_lists_exactly_the_modules_there_are():
    section = README.read_text().split("\n## Layout", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^cmd_ray/(\S+?)(?:\.py|/)\s", section, flags=re.MULTILINE))
    files = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert listed == files | packages


def test_no_module_is_over_500_lines_and_no_function_over_60():
    """Modules are split by concern before they grow past what one reading holds (issue 31)."""
    long_modules, long_functions = [], []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if text.count("\n") > 500:
            long_modules.append(f"{_module_name(path)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long_functions.append(f"{_module_name(path)}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long_modules and not long_functions, long_modules + long_functions
