"""What a downloaded model may run when MLflow loads it: this cnnlab's model file, nothing the model's writer chose."""
from __future__ import annotations

from pathlib import Path

import yaml

MODEL_CODE = Path(__file__).with_name("model_code.py")  # the file log_bundle logs as the model
LOADER = "mlflow.pyfunc.loaders.code_model"
RELOG = ("log it again with this cnnlab: `cnnlab ensemble RUN_ID` re-logs the run's weights (read as weights only) "
         "as a new run, `cnnlab train` retrains; then `cnnlab register`. Or pass --trust-model-code if you trust "
         "whoever wrote this model version")


class UntrustedModel(ValueError):
    """A model MLflow would run code of that the installed cnnlab did not ship."""


def _refuse(model: Path, name: str, why: str) -> None:
    raise UntrustedModel(f"model file {name} (in {model}): {why}; refused: {RELOG}")


def _pyfunc(model: Path) -> dict:
    """The MLmodel's python_function configuration, read as plain YAML (no MLflow object built from it)."""
    try:
        conf = yaml.safe_load((model / "MLmodel").read_text())["flavors"]["python_function"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        _refuse(model, "MLmodel", f"no readable python_function flavor ({type(e).__name__}: {e})")
    if not isinstance(conf, dict):
        _refuse(model, "MLmodel", "python_function is not a mapping")
    return conf


def verify_model(model: Path | str) -> None:
    """Raise UntrustedModel, naming the file, unless loading the downloaded `model` folder runs only the installed
    cnnlab: the code-model loader, a model file byte-identical to ours, a code folder holding only cnnlab/."""
    model = Path(model)
    conf = _pyfunc(model)
    if (model / "python_model.pkl").exists() or "python_model" in conf:
        _refuse(model, "python_model.pkl", "a pickled Python object (a model logged before models-from-code) runs "
                                           "code of the model's writer when unpickled")
    if conf.get("loader_module") != LOADER or conf.get("data") or "model_code_path" not in conf:
        _refuse(model, "MLmodel", f"python_function must load with {LOADER} from the model folder, got loader "
                                  f"{conf.get('loader_module')!r}, data {conf.get('data')!r}")
    code_file = model / Path(str(conf["model_code_path"])).name
    if code_file.name != MODEL_CODE.name or not code_file.is_file() or code_file.read_bytes() != MODEL_CODE.read_bytes():
        _refuse(model, code_file.name, f"not byte-identical to the installed {MODEL_CODE}")
    _check_code_folder(model, conf.get("code"))


def _check_code_folder(model: Path, code: str | None) -> None:
    """MLflow puts the code folder first on sys.path: any top-level module there would shadow an installed one."""
    if code is None:
        return
    if code != "code":
        _refuse(model, "MLmodel", f"code folder {code!r}, expected 'code'")
    extra = sorted(p.name for p in (model / code).iterdir() if p.name != "cnnlab")
    if extra:
        _refuse(model, f"{code}/{extra[0]}", "a top-level module beside cnnlab/ in the code folder would shadow "
                                             "installed packages")
    if (model / code / "cnnlab" / "__init__.py").exists():
        _refuse(model, f"{code}/cnnlab/__init__.py", "a regular package would shadow the installed cnnlab")


def load_model(model_uri: str, trust_model_code: bool = False):
    """mlflow.pyfunc.load_model of `model_uri`, downloaded and verified first (unless `trust_model_code`)."""
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory(prefix="cnnlab-model-") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)
        if not trust_model_code:
            verify_model(local)
        return mlflow.pyfunc.load_model(local)  # the bundle is read into memory: the folder may go
