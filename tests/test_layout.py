"""The package's shape: dependencies point one way, `import gaze` and `gaze --help` stay light."""

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ["attention", "cli", "discovery", "errors", "families", "generation", "models", "plots", "prompts", "ranking",
        "regions", "scoring", "steering", "strips", "tracking"]
NOT_IN_CORE = ("gaze.eval", "gaze.testing", "gaze.organism", "datagen", "space", "gradio")


def _loaded_after(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_gaze_and_the_cli_parser_load_no_heavy_module():
    for code in ("import gaze", "import gaze.cli; gaze.cli.build_parser()"):
        loaded = _loaded_after(code)
        heavy = [m for m in loaded if m.split(".")[0] in ("torch", "transformers", "numpy", "datasets", "gradio")]
        assert not heavy, (code, heavy[:5])


def test_core_modules_import_nothing_of_eval_training_datagen_or_gradio():
    loaded = _loaded_after("; ".join(f"import gaze.{m}" for m in CORE))
    bad = [m for m in loaded if m.startswith(NOT_IN_CORE)]
    assert not bad, bad


def _module_imports(path: Path, modules) -> set[str]:
    """Modules imported at module level (not inside functions) by one file (`from pkg import mod` -> pkg.mod)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names} & set(modules)
            found |= subs or {node.module}
    return found


def test_no_import_cycles_and_dependencies_point_one_way():
    modules = {}
    for folder in ("gaze", "gaze/eval", "datagen", "space"):
        for f in sorted((ROOT / folder).glob("*.py")):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = f
    graph = {m: {i for i in _module_imports(f, modules) if i in modules and i != m} for m, f in modules.items()}
    # one way: space -> gaze.eval -> gaze core; datagen meets gaze only through gaze.strips (and its errors)
    for m, deps in graph.items():
        if m.startswith("gaze") and not m.startswith("gaze.eval"):
            assert not {d for d in deps if d.startswith(("gaze.eval", "space", "datagen"))}, (m, deps)
        if m.startswith("gaze.eval"):
            assert not {d for d in deps if d.startswith(("space", "datagen"))}, (m, deps)
        if m.startswith("datagen"):
            assert {d for d in deps if d.startswith("gaze")} <= {"gaze.strips", "gaze.errors"}, (m, deps)
    seen, stack = set(), []

    def visit(m):
        if m in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if m in seen:
            return
        stack.append(m)
        for d in graph[m]:
            visit(d)
        stack.pop()
        seen.add(m)

    for m in graph:
        visit(m)


def test_public_names_still_work():
    import gaze

    for name in gaze.__all__:
        assert getattr(gaze, name) is not None
    assert gaze.Panel(3).k == 3 and callable(gaze.steer) and issubclass(gaze.GazeError, ValueError)
