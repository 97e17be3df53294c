"""The shape of the code, read from its imports (every import, at any depth in a file):

    cli  ->  api (app.main, app.api)  |  worker side (worker.runner, worker.tasks, worker.celery_app)
                    \\                        /
                     core (app.core): torch-free
                              |
               engine (worker.engine): torch, no web, database or queue

The API and the worker side never import each other; the core imports neither; the engine imports
nothing above it; the API and the core touch only the engine's torch-free modules; no two modules
import each other, directly or round a circle.
"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH_FREE_ENGINE = {"worker.engine", "worker.engine.allocator", "worker.engine.catalogue", "worker.engine.errors",
                     "worker.engine.hub", "worker.engine.paths", "worker.engine.plan", "worker.engine.search",
                     "worker.engine.sizing", "worker.engine.spec"}


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    modules = {_module(p): p for folder in ("app", "worker") for p in (ROOT / folder).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] +
                                    ([base] if base else []))
                found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                          for alias in node.names}
        graph[name] = {target for target in found if target in modules and target != name}
    return graph


def _layer(module: str) -> str:
    if module.startswith("worker.engine"):
        return "engine"
    if module.startswith("app.core"):
        return "core"
    if module.startswith("app.cli"):
        return "cli"
    if module == "app.main" or module.startswith("app.api"):
        return "api"
    if module.startswith("worker"):
        return "worker"
    return "package"


FORBIDDEN = {"engine": {"core", "api", "worker", "cli"}, "core": {"api", "worker", "cli"},
             "api": {"worker", "cli"}, "worker": {"api", "cli"}}


def test_layers_import_only_downwards():
    offences = [f"{source} -> {target}" for source, targets in _imports().items() for target in targets
                if _layer(target) in FORBIDDEN.get(_layer(source), set())]
    assert offences == []


def test_api_and_core_touch_only_the_engines_torch_free_modules():
    offences = [f"{source} -> {target}" for source, targets in _imports().items()
                if _layer(source) in ("api", "core") for target in targets
                if _layer(target) == "engine" and target not in TORCH_FREE_ENGINE]
    assert offences == []


def test_no_import_circles():
    graph = _imports()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert circles == []


def test_the_api_process_does_not_load_torch():
    code = "import sys, app.main; app.main.create_app(); print(sorted(m for m in ('torch', 'torchao', " \
           "'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_torch_free_engine_modules_are_torch_free():
    code = f"import sys; import {', '.join(sorted(TORCH_FREE_ENGINE))}; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr
