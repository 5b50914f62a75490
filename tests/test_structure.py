"""The code's shape as the contributors' guide states it: no import circles (lazy imports included),
dependencies flowing pipelines -> train -> curate, and the two central files kept readable."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("curate", "train", "pipelines")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}


def imports_of(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Project modules ``path`` imports anywhere in its body (top level, in functions, under TYPE_CHECKING)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, name, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_sees_a_lazy_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_dependencies_flow_pipelines_train_curate():
    graph = import_graph()
    upward = {(m, d) for m, deps in graph.items() for d in deps
              if (m.startswith("curate") and not d.startswith("curate"))
              or (m.startswith("train") and d.startswith("pipelines"))}
    assert upward == set()


def test_only_the_command_line_and_pipelines_import_the_score_runner():
    importers = {m for m, deps in import_graph().items() if "curate.score.runner" in deps}
    assert importers <= {"curate.cli"} | {m for m in importers if m.startswith("pipelines")}


@pytest.mark.parametrize("path", ["curate/score/runner.py", "train/distill.py"])
def test_central_files_stay_short(path):
    assert len((REPO / path).read_text().splitlines()) < 250


def test_the_trainer_reads_shards_without_duckdb():
    code = "import sys, train.cli, train.distill; print('duckdb' in sys.modules, 'faiss' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.split() == ["False", "False"]


def test_the_project_models_and_pools_load_without_torchvision():
    # importing torchvision costs every command about 3 seconds (torchvision.ops pulls in torch._dynamo): only a
    # torchvision model, a resize or an on-device JPEG decode should pay it
    code = "\n".join([
        "import sys, torch, train.cli, train.distill, curate.cli, curate.pools, curate.teachers",
        "from curate.models import build_model",
        "from curate.spec import Geometry",
        "build_model('resnet8', num_classes=10, in_channels=1, image_size=28)",
        "Geometry(1, 28)(torch.zeros(1, 28, 28, dtype=torch.uint8))  # already the model's size: no transform",
        "print('torchvision' in sys.modules)"])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.split() == ["False"]


def test_the_query_commands_start_without_torch():
    # `curate --help`, `curate sql` and `curate select` are DuckDB work: importing torch and torchvision would
    # cost them seconds of start-up
    code = ("import sys, curate.cli, curate.query.sql, curate.query.select, curate.query.report; "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.split() == ["False"]
