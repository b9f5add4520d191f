"""pyproject's dependency ranges match what the code calls: the installed versions satisfy them, and every module-level
name (and keyword argument) that cnnlab takes from MLflow and Optuna exists in the lowest version allowed, read from
that version's wheel (downloaded once into the cnnlab cache)."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted((REPO / "src" / "cnnlab").rglob("*.py"))
# the packages whose APIs cnnlab calls most and which move fastest, and the wheel that holds each one's Python API
CHECKED = {"mlflow": "mlflow-skinny", "optuna": "optuna"}


def requirements() -> dict[str, Requirement]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {Requirement(d).name: Requirement(d) for d in deps}


def test_installed_versions_satisfy_pyproject():
    wrong = {}
    for name, req in requirements().items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = "not installed"
        if installed == "not installed" or not req.specifier.contains(installed, prereleases=True):
            wrong[name] = f"{installed}, pyproject wants {req.specifier}"
    assert not wrong, wrong


def test_conda_env_lists_the_same_ranges():
    import yaml

    conda = yaml.safe_load((REPO / "conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert {str(Requirement(d)) for d in pip if d != "-e ."} == {str(r) for r in requirements().values()}


def floor(name: str) -> str:
    """The lowest version pyproject allows (its >= or == bound)."""
    bounds = [s.version for s in requirements()[name].specifier if s.operator in (">=", "==")]
    assert bounds, f"pyproject gives {name} no lower bound"
    return max(bounds)


def wheel_source(dist: str, ver: str, tmp_root: Path) -> Path:
    """A package's files at one version: its wheel from PyPI, unpacked once into the cnnlab cache."""
    root = Path(os.environ.get("CNNLAB_CACHE", Path.home() / ".cache" / "cnnlab")) / "floors" / f"{dist}-{ver}"
    if not (root / "RECORD-unpacked").is_file():
        wheels = tmp_root / dist
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                               "-d", str(wheels), f"{dist}=={ver}"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"cannot download {dist}=={ver} from PyPI: {proc.stderr[-2000:]}"
        with zipfile.ZipFile(next(wheels.glob("*.whl"))) as wheel:
            wheel.extractall(root)
        (root / "RECORD-unpacked").touch()
    return root


class Floor:
    """Static lookups in a package's source tree: does `pkg.mod.Name.attr` exist, and with which parameters?"""

    def __init__(self, root: Path):
        self.root, self.trees, self.packages = root, {}, set()

    def module(self, dotted: str) -> ast.Module | None:
        if dotted not in self.trees:
            base = self.root / dotted.replace(".", "/")
            path = next((p for p in (base / "__init__.py", base.with_suffix(".py")) if p.is_file()), None)
            self.trees[dotted] = ast.parse(path.read_text()) if path else None
            if path and path.name == "__init__.py":
                self.packages.add(dotted)
        return self.trees[dotted]

    def absolute(self, node: ast.ImportFrom, module: str) -> str:
        """The module a `from ... import` names, relative imports resolved against `module`."""
        if not node.level:
            return node.module
        parts = module.split(".")
        base = parts[: len(parts) - node.level + (module in self.packages)]
        return ".".join(base + ([node.module] if node.module else []))

    def resolve(self, dotted: str, depth: int = 0):
        """The definition (a FunctionDef, ClassDef, other node, or True where it cannot tell) or None if missing."""
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):  # the longest prefix that is a module
            tree = self.module(".".join(parts[:i]))
            if tree is not None:
                return self._lookup(tree, ".".join(parts[:i]), parts[i:], depth)
        return None

    def _lookup(self, tree, module: str, names: list[str], depth: int):
        if not names:
            return tree
        found = self._member(tree.body, names[0], module, depth)
        if found is None and self._member(tree.body, "__getattr__", module, depth) is not None:
            return True  # a lazy module attribute: cannot tell statically
        for name in names[1:]:
            if not isinstance(found, ast.ClassDef):
                return True if found is not None else None  # an attribute of a value: cannot tell statically
            member = self._member(found.body, name, module, depth)
            found = member if member is not None else (True if found.bases else None)
        return found

    def _member(self, body, name: str, module: str, depth: int):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
                return node
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [e for t in targets for e in (t.elts if isinstance(t, ast.Tuple) else [t])]
                if any(isinstance(t, ast.Name) and t.id == name for t in names):
                    return node
            if isinstance(node, ast.ImportFrom) and depth < 10:
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        source = self.absolute(node, module)
                        target = f"{source}.{alias.name}"
                        return self.resolve(target, depth + 1) or self.module(target)
            if isinstance(node, ast.Import):
                if any((a.asname or a.name) == name for a in node.names):
                    return True
            if isinstance(node, (ast.If, ast.Try)):  # version-dependent definitions
                found = self._member(node.body + getattr(node, "orelse", []), name, module, depth)
                if found is not None:
                    return found
        return None


def _dotted(node) -> str | None:
    """`a.b.c` of a name, and `A().b` as `A.b` (a method of the class)."""
    parts = []
    while isinstance(node, (ast.Attribute, ast.Call)):
        if isinstance(node, ast.Attribute):
            parts.append(node.attr)
        node = node.value if isinstance(node, ast.Attribute) else node.func
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def uses(package: str, sources: list[Path] = SOURCES) -> dict[str, set[str]]:
    """Every dotted name from `package` that cnnlab's source uses -> the keyword arguments it passes to it."""
    found: dict[str, set[str]] = {}
    for path in sources:
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                aliases.update({(a.asname or a.name.split(".")[0]): (a.name if a.asname else a.name.split(".")[0])
                                for a in node.names if a.name.split(".")[0] == package})
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module.split(".")[0] == package:
                for a in node.names:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                    found.setdefault(f"{node.module}.{a.name}", set())
        for node in ast.walk(tree):
            name = _dotted(node.func if isinstance(node, ast.Call) else node)
            if isinstance(node, (ast.Call, ast.Attribute)) and name and name.split(".")[0] in aliases:
                full = ".".join([aliases[name.split(".")[0]], *name.split(".")[1:]])
                keywords = {k.arg for k in node.keywords if k.arg} if isinstance(node, ast.Call) else set()
                found.setdefault(full, set()).update(keywords)
    return found


def missing_at_floor(package: str, root: Path, sources: list[Path] = SOURCES) -> list[str]:
    floor_api, missing = Floor(root), []
    for name, keywords in sorted(uses(package, sources).items()):
        node = floor_api.resolve(name)
        if node is None:
            missing.append(name)
            continue
        if isinstance(node, ast.ClassDef):
            node = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.args.kwarg:
            params = {a.arg for a in node.args.args + node.args.kwonlyargs + node.args.posonlyargs}
            missing += [f"{name}({k}=...)" for k in sorted(keywords - params)]
    return missing


@pytest.mark.parametrize("package", sorted(CHECKED))
def test_what_cnnlab_calls_exists_in_the_lowest_allowed_version(package, tmp_path):
    names = uses(package)
    assert names, f"cnnlab uses nothing of {package}: drop it from CHECKED"
    missing = missing_at_floor(package, wheel_source(CHECKED[package], floor(package), tmp_path))
    assert not missing, (f"{package}=={floor(package)} (pyproject's floor) lacks {missing}: raise the floor to the "
                         f"first version that has them")


def test_the_check_finds_a_name_missing_at_the_floor(tmp_path):
    """The checker itself: cnnlab needs Optuna 4.9's heartbeat-retry names, so a floor of 4.8 would fail."""
    floor_api = wheel_source("optuna", "4.8.0", tmp_path)
    assert "optuna.storages.RetryHeartbeatStaleTrialCallback" in missing_at_floor("optuna", floor_api)
    planted = tmp_path / "planted.py"  # a keyword argument that 4.8's RDBStorage does not take
    planted.write_text("import optuna\noptuna.storages.RDBStorage('sqlite://', heartbeat_stale_trial_callback=print)\n")
    assert missing_at_floor("optuna", floor_api, [planted]) == [
        "optuna.storages.RDBStorage(heartbeat_stale_trial_callback=...)"]
