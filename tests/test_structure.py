"""The code's shape, checked: no import cycle between the modules of pipeline/ and shards/ (imports inside
functions included: they hide cycles), and the modules that serve inference import without DALI."""
import ast
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.quick


def imports_in(path, inside_functions_only: bool = False):
    """(line, imported module name) for each import statement of `path` (relative ones skipped), anywhere
    in its body or only inside its functions."""
    tree = ast.parse(path.read_text())
    scopes = [f for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))] \
        if inside_functions_only else [tree]
    seen = set()
    for scope in scopes:
        for node in ast.walk(scope):
            if id(node) in seen:  # a nested function's imports: once
                continue
            seen.add(id(node))
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            yield from ((node.lineno, n) for n in names)


def project_modules():
    """(module name, its path) for each module of pipeline/ and shards/."""
    for package in ("pipeline", "shards"):
        for path in sorted((REPO / package).glob("*.py")):
            yield (package if path.stem == "__init__" else f"{package}.{path.stem}"), path


def project_imports() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its body."""
    return {name: {n for _, n in imports_in(path) if n.split(".")[0] in ("pipeline", "shards")} - {name}
            for name, path in project_modules()}


def test_no_import_cycle_in_pipeline_and_shards():
    graph = project_imports()
    assert {"pipeline.inference", "pipeline.evaluate", "pipeline.predict", "shards.format", "pipeline.metrics",
            "pipeline.validate", "pipeline.runs", "pipeline.track"} <= set(graph)
    cycles = []

    def visit(node, path):
        for dep in graph.get(node, ()):
            if dep == path[0]:
                cycles.append(" -> ".join(path + [dep]))
            elif dep not in path:
                visit(dep, path + [dep])

    for module in graph:
        visit(module, [module])
    assert not cycles, cycles
    assert "pipeline.predict" not in graph["pipeline.evaluate"] and "pipeline.evaluate" not in graph["pipeline.predict"]


def test_each_side_imports_only_what_it_needs():
    """Issue 49: the run's tracker (write side) neither exports the model (train.py exports, then hands it the
    file) nor evaluates; the metrics are pure (no model, no data loading, no tracking); the tracker does not
    know the read side."""
    graph = project_imports()
    assert not {"pipeline.export", "pipeline.evaluate"} & graph["pipeline.track"], graph["pipeline.track"]
    assert "pipeline.runs" not in graph["pipeline.track"]
    assert graph["pipeline.metrics"] <= {"shards.datasets"}, graph["pipeline.metrics"]


# What may be imported inside a function instead of at the top of its module: DALI (its graph in
# pipeline.data; inference runs without it), deepspeed (after DS_ACCELERATOR is set), matplotlib (after its
# backend is chosen), torch's compiler (2.4 s to import, needed only with train.compile); and in the command
# line's doors, each command's own module.
LAZY_MODULES = ("pipeline.data", "nvidia.dali", "deepspeed", "matplotlib", "torch._inductor")
COMMAND_DOORS = ("pipeline/cli.py", "pipeline/show.py")


def test_imports_are_at_the_top_but_for_the_heavy_optional_ones():
    inside = [f"{path.relative_to(REPO)}:{line} {n}" for _, path in project_modules()
              if str(path.relative_to(REPO)) not in COMMAND_DOORS
              for line, n in imports_in(path, inside_functions_only=True)
              if not any(n == m or n.startswith(m + ".") for m in LAZY_MODULES)]
    assert not inside, inside


def test_inference_modules_import_without_dali():
    script = ("import sys\nsys.modules['nvidia.dali'] = None\n"
              "import pipeline.inference, pipeline.evaluate, pipeline.predict, pipeline.export, pipeline.track, "
              "pipeline.inputs, shards.format, pipeline.cli, pipeline.metrics, pipeline.validate, pipeline.runs\n"
              "assert 'pipeline.data' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


MAX_PARAMETERS = 6  # more, and the call sites turn into rows of positional values nobody can check by eye


def test_no_function_in_pipeline_takes_more_than_six_parameters():
    """Settings that travel together travel as one object (a config section, the ModelRecord, EvalOptions): a
    function or method (self/cls not counted, *args/**kwargs neither) names at most six parameters."""
    crowded = []
    for path in sorted((REPO / "pipeline").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
                names = names[1:] if names[:1] in (["self"], ["cls"]) else names
                if len(names) > MAX_PARAMETERS:
                    crowded.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({len(names)})")
    assert not crowded, crowded
