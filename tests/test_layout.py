"""The four wings and their import rule: every `import` in the AST, function-level ones included."""
import ast
import json
import tarfile
from pathlib import Path

import mlflow
import numpy as np
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cnnlab"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
WINGS = ("core", "tracking", "serving", "stack")
ALLOWED = {  # wing -> the cnnlab modules it may import (a prefix match); the CLI and __main__ may import anything
    "core": ("cnnlab.core",),
    "serving": ("cnnlab.core", "cnnlab.serving"),
    "tracking": ("cnnlab.core", "cnnlab.tracking", "cnnlab.serving"),  # serving: only its public model API
    "stack": ("cnnlab.core", "cnnlab.stack"),
}
SERVING_API = "cnnlab.serving"  # what tracking may import of serving: the package itself, not its modules
FOREIGN = {"core": ("mlflow", "optuna")}  # third-party packages a wing must not import


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, relative ones resolved; `from X import name` also gives
    X.name, so `from cnnlab import serving` counts as importing cnnlab.serving."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names if f"{base}.{a.name}".startswith("cnnlab.")
                      and base.count(".") < 1]
    return found


def violations(root: Path) -> list[str]:
    """Every import that breaks the rule, as `file:line imports module`."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        wing = rel.parts[0] if len(rel.parts) > 1 else None
        if wing not in WINGS:
            continue
        for line, target in imports_of(path, root):
            top = target.split(".")[0]
            if top in FOREIGN.get(wing, ()):
                bad.append(f"{rel}:{line} imports {target}")
            if top != "cnnlab" or target == "cnnlab":
                continue
            allowed = target.startswith(tuple(p + "." for p in ALLOWED[wing])) or target in ALLOWED[wing]
            if wing == "tracking" and target.startswith(SERVING_API + "."):
                allowed = False
            if not allowed:
                bad.append(f"{rel}:{line} imports {target}")
    return bad


def test_every_module_sits_in_a_wing_or_is_the_cli():
    top = sorted(p.name for p in PACKAGE.iterdir()
                 if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))
    assert top == ["__init__.py", "__main__.py", "cli.py", *sorted(WINGS)]


def test_imports_follow_the_wings():
    assert violations(PACKAGE) == []


@pytest.mark.parametrize("wing, line, expect", [
    ("core", "from cnnlab.tracking import runs", "core/planted.py:2 imports cnnlab.tracking"),
    ("core", "def f():\n    import mlflow", "core/planted.py:3 imports mlflow"),
    ("serving", "def f():\n    from ..stack import team", "serving/planted.py:3 imports cnnlab.stack"),
    ("stack", "from cnnlab import tracking", "stack/planted.py:2 imports cnnlab.tracking"),
    ("tracking", "from cnnlab.serving.guard import serve", "tracking/planted.py:2 imports cnnlab.serving.guard"),
])
def test_a_planted_forbidden_import_is_caught(tmp_path, wing, line, expect):
    root = tmp_path / "cnnlab"
    for w in WINGS:
        (root / w).mkdir(parents=True)
        (root / w / "__init__.py").write_text("")
    (root / wing / "planted.py").write_text(f'"""Planted."""\n{line}\n')
    assert violations(root) == [expect]


def test_allowed_imports_pass(tmp_path):
    root = tmp_path / "cnnlab"
    for w in WINGS:
        (root / w).mkdir(parents=True)
    (root / "tracking" / "ok.py").write_text("from cnnlab import serving\nfrom cnnlab.core import models\n")
    (root / "serving" / "ok.py").write_text("from ..core import preprocess\nfrom .model import CnnlabModel\n")
    assert violations(root) == []


def test_a_model_logged_before_the_move_loads_and_predicts_the_same(tmp_path):
    """tests/fixtures/model_before_move.tar.gz: a small vgg_bn logged by the flat-layout cnnlab (commit cfbbfd6) with
    its python_model.pkl and code copy; answers.json holds what it predicted then."""
    with tarfile.open(FIXTURES / "model_before_move.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    expected = json.loads((FIXTURES / "answers.json").read_text())
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    answers = model.predict(np.array(expected["pixels"], dtype=np.uint8))
    assert [a["label"] for a in answers] == [a["label"] for a in expected["answers"]]
    for got, want in zip(answers, expected["answers"]):
        assert got.keys() == want.keys()
        assert all(abs(got[k] - want[k]) < 1e-6 for k in want if k.startswith("prob_"))


def test_no_function_is_over_60_lines():
    """Read top to bottom: a function longer than a screen is split into named steps."""
    long = [f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted(PACKAGE.rglob("*.py")) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert long == []
