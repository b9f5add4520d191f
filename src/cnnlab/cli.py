"""cnnlab: image-classification experiments tracked in MLflow (Fashion-MNIST, FER2013): train, tune, register,
compare, reproduce the reports, and try a served model in the browser."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

# the config (and with it torch) loads only for the commands and help texts that need it: `cnnlab stack` starts fast


class _Parser(argparse.ArgumentParser):
    """An argument parser whose epilog is computed when help is printed."""

    def __init__(self, *args, epilog_from=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.epilog_from = epilog_from

    def format_help(self) -> str:
        self.epilog = self.epilog_from() if self.epilog_from else self.epilog
        return super().format_help()


def _argument(kind: str, least: int | None = None):
    """An argparse type from the config's value parser: a bool, or a count of at least `least`."""
    def parse(text: str):
        from cnnlab.core.config import parse_text

        try:
            value = parse_text(kind, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if least is not None and value < least:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {least}, got {text!r}")
        return value
    return parse


def cmd_train(args) -> int:
    from cnnlab.core.config import make_config, parse_params

    cfg = make_config(args.experiment, **parse_params(args.param + args.params.split()))
    if args.show_config:
        print(show_config(cfg))
        return 0
    from cnnlab.core import distributed
    from cnnlab.tracking.experiments import run

    distributed.setup()  # under torchrun: join its process group; rank 0 logs the one MLflow run
    try:
        print(json.dumps(run(cfg), indent=2))
    finally:
        distributed.teardown()
    return 0


def _allowed(name: str, allowed: dict) -> str:
    return "|".join(map(str, allowed[name])) if name in allowed else ""


def show_config(cfg) -> str:
    """Every field of `cfg`: value (* where it differs from the experiment's default), type and allowed values."""
    from dataclasses import asdict

    from cnnlab.core.config import allowed_values, field_types, make_config

    preset, types, allowed = asdict(make_config(cfg.experiment)), field_types(), allowed_values()
    rows = [("field", "value", "type", "allowed"), *(
        (k, f"{v}{' *' if v != preset[k] else ''}", types[k], _allowed(k, allowed)) for k, v in asdict(cfg).items())]
    return _table(rows) + "\n* set by -P; change any field with -P FIELD=VALUE"


def cmd_experiments(args) -> int:
    from dataclasses import asdict

    from cnnlab.core.config import PRESETS, allowed_values, field_types, make_config

    configs = {name: asdict(make_config(name)) for name in PRESETS}
    types, allowed = field_types(), allowed_values()
    lines = [f"{name:14} {preset.summary}" for name, preset in PRESETS.items()]
    rows = [("field", "type", *PRESETS, "allowed"), *(
        (k, types[k], *(str(c[k]) for c in configs.values()), _allowed(k, allowed)) for k in types)]
    print("\n".join([*lines, "", _table(rows), "", "cnnlab train EXPERIMENT -P FIELD=VALUE ... "
                     "(or mlflow run . -e EXPERIMENT -P FIELD=VALUE for the fields MLproject lists)"]))
    return 0


def _table(rows: list[tuple]) -> str:
    from cnnlab.core.logs import table

    return table(rows[1:], rows[0], markdown=False)


def cmd_ensemble(args) -> int:
    from cnnlab.core.config import parse_params
    from cnnlab.tracking.experiments import ensemble

    result = ensemble(args.runs, args.name, parse_params(args.param))
    print(json.dumps(result, indent=2))
    print(f"cnnlab ensemble: run {result['run_id']} of {len(result['members'])} models; register it with "
          f"`cnnlab register {result['name']}`", file=sys.stderr)
    return 0


def cmd_reproduce(args) -> int:
    from cnnlab.core.config import parse_params
    from cnnlab.tracking.reproduce import reproduce

    only = [name for item in args.only for name in item.split(",") if name]
    result = reproduce(quick=args.quick, only=only, overrides=parse_params(args.param), out=args.out)
    print(json.dumps({k: result[k] for k in ("markdown", "html", "parent_run_id")}, indent=2))
    return 0


def cmd_stack(args) -> int:
    from cnnlab.stack import Stack, docker_secrets

    stack = Stack(args.root, mlflow_port=args.mlflow_port, s3_port=args.s3_port, pg_port=args.pg_port,
                  workers=args.workers, host=args.host)
    if args.action == "down":
        stack.down()
    if args.action == "up":
        urls = stack.up()
        print(f"cnnlab stack: admin credentials in {urls['admin_credentials']}; add teammates with `cnnlab stack user "
              f"add NAME`; tuning workers here: export PGPASSFILE={urls['pgpass']}", file=sys.stderr)
    if args.action == "rotate":
        stack.rotate(args.what)
    if args.action == "docker-secrets":
        print(json.dumps({"folder": args.folder, "secrets": docker_secrets(args.folder)}, indent=2))
        return 0
    status = stack.status()
    print(json.dumps({"status": status, **(stack.urls() if any(status.values()) else {})}, indent=2))
    return 0 if args.action == "down" or all(status.values()) else 1


def cmd_stack_user(args) -> int:
    from cnnlab.stack import Stack

    stack = Stack(args.root)
    if args.tracking_uri:
        stack.manage(args.tracking_uri, args.admin_credentials or stack.mlflow.admin_credentials)
    if args.user_action == "add":
        result = stack.add_user(args.name, read_only=args.read_only, out=args.out, worker=args.worker)
    elif args.user_action == "passwd":
        result = stack.set_password(args.name, out=args.out)
    elif args.user_action == "remove":
        stack.remove_user(args.name)
        result = {"removed": args.name}
    else:
        result = stack.list_users()
    print(json.dumps(result, indent=2))
    if "credentials" in result:
        print(f"cnnlab stack user: the password is in {result['credentials']} (mode 0600); hand it over privately; "
              f"load it with: set -a; . {result['credentials']}; set +a", file=sys.stderr)
    return 0


def cmd_register(args) -> int:
    from cnnlab.tracking.registry import register

    result = register(args.experiment or None, args.study or None, args.name or None, args.force)
    print(json.dumps(result, indent=2))
    print(f"cnnlab register: {result['name']} v{result['version']}: {result['reason']}", file=sys.stderr)
    return 0


def cmd_tune(args) -> int:
    from cnnlab.core.config import parse_params
    from cnnlab.tracking.tuning import load_spec, tune

    params = parse_params(args.param + args.params.split())
    storage = args.storage
    if args.credentials:  # a worker joining the team's study: server, storage and passwords from its files
        from cnnlab.stack.secrets import worker_environment

        os.environ.update(worker_environment(Path(args.credentials)))
        storage = storage or os.environ.get("CNNLAB_OPTUNA_STORAGE")
    spec = load_spec(args.space, params, storage=storage, study_name=args.study_name, n_trials=args.n_trials)
    print(json.dumps(tune(spec, workers=args.workers, final=args.final), indent=2, default=str))
    return 0


def cmd_serve(args) -> int:
    from cnnlab.serving.guard import serve

    serve(args.model_uri, host=args.host, port=args.port, workers=args.workers, threads=args.threads,
          timeout=args.timeout, trust_model_code=args.trust_model_code, follow=args.follow, shadow=args.shadow,
          shadow_rate=args.shadow_rate)
    return 0


def cmd_demo(args) -> int:
    from cnnlab.serving.demo import serve

    serve(args.model_url, host=args.host, port=args.port, max_body_mb=args.max_body_mb)
    return 0


def cmd_mlproject(args) -> int:
    print(mlproject(), end="")
    return 0


# the entry points besides the experiments': parameter defaults (None: the Config field's) and the command line
COMMAND_ENTRY_POINTS = {
    "reproduce": ({"quick": False, "only": "", "out": "reports", "device": None, "precision": None},
                  "python -m cnnlab reproduce --quick {quick} --only {only} --out {out} -P device={device} "
                  "-P precision={precision}"),
    "register": ({"experiment": "", "study": "", "name": "", "force": False},
                 "python -m cnnlab register {experiment} --study {study} --name {name} --force {force}"),
    "ddp": ({"experiment": "fmnist_cnn", "nproc": "2", "params": ""},  # torchrun: a count, or gpu (one per GPU)
            "torchrun --standalone --nproc_per_node {nproc} -m cnnlab train {experiment} --params {params}"),
    "tune": ({"space": "tuning/fmnist_cnn.yaml", "storage": "", "study_name": "", "n_trials": 0, "workers": 1,
              "params": "", "final": True},
             "python -m cnnlab tune {space} --storage {storage} --study-name {study_name} --n-trials {n_trials} "
             "--workers {workers} --params {params} --final {final}"),
}


def _parameter(default) -> str:
    """An MLproject parameter: numbers are floats (ints arrive as "3.0"), the rest text, quoted where YAML would
    read it as something else."""
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        return f"{{type: float, default: {default}}}"
    text = str(default).lower() if isinstance(default, bool) else default
    return f"{{type: string, default: {text if text and yaml.safe_load(text) == text else json.dumps(text)}}}"


def _entry_point(name: str, defaults: dict, command: str) -> list[str]:
    lines = [f"  {name}:", "    parameters:", *(f"      {key}: {_parameter(v)}" for key, v in defaults.items())]
    folded = [""]
    for word in command.split(" "):  # fold at -P / -- options, never inside one
        if word.startswith("-") and len(folded[-1]) > 90:
            folded.append("")
        folded[-1] = f"{folded[-1]} {word}".strip()
    return lines + ["    command: >-", *(f"      {line}" for line in folded), ""]


def mlproject() -> str:
    """The MLproject file: one entry point per preset (its parameters and defaults), then the other commands."""
    from cnnlab.core.config import PRESETS, RUN_PARAMS, make_config

    lines = ["# Generated from the presets in src/cnnlab/core/config.py: python -m cnnlab mlproject > MLproject",
             "name: cnnlab", "", "conda_env: conda.yaml", "", "entry_points:"]
    for name, preset in PRESETS.items():
        cfg = make_config(name)
        params = preset.params + RUN_PARAMS
        command = f"python -m cnnlab train {name} " + " ".join(f"-P {p}={{{p}}}" for p in params)
        lines += _entry_point(name, {p: getattr(cfg, p) for p in params}, command)
    for name, (defaults, command) in COMMAND_ENTRY_POINTS.items():
        defaults = {k: getattr(make_config("fmnist_cnn"), k) if v is None else v for k, v in defaults.items()}
        lines += _entry_point(name, defaults, command)
    return "\n".join(lines[:-1]) + "\n"


def _train_epilog() -> str:
    """The experiments, and each dataset's options (-P NAME=VALUE), from the presets and the dataset registry."""
    from cnnlab.core import data
    from cnnlab.core.config import PRESETS

    lines = ["experiments:", *(f"  {name:14} {preset.summary}" for name, preset in PRESETS.items()),
             "datasets (-P dataset=NAME) and their options:"]
    for name in data.names():
        options = [o.name + (f" {'|'.join(map(str, o.allowed))}" if o.allowed else "") for o in data.get(name).options]
        lines.append(f"  {name:14} {', '.join(options) or 'none'}")
    return "\n".join(lines)


def cmd_compare(args) -> int:
    from cnnlab.tracking.compare import compare

    options = {"n_resamples": args.resamples, "seed": args.seed, "alpha": args.alpha}
    result = compare(args.run_a, args.run_b, args.split, **{k: v for k, v in options.items() if v is not None})
    print(json.dumps(result, indent=2))
    print(f"cnnlab compare: {result['summary']}", file=sys.stderr)
    return 0


def cmd_runs(args) -> int:
    from pathlib import Path

    from cnnlab.tracking import transfer

    if args.action == "export":
        folder = Path(args.dest)
        manifest = transfer.export_runs(folder, args.tracking_uri or None, args.experiment or None, args.weights_dtype)
        result = {"folder": str(folder), "runs": len(manifest["runs"]), "models": len(manifest["models"]),
                  "bytes": transfer.folder_bytes(folder)}
        if args.pack:
            parts = transfer.pack(folder, Path(args.pack), part_bytes=int(args.part_mb * 2**20))
            result["parts"] = [str(p) for p in parts]
    else:
        result = transfer.import_runs(Path(args.source), args.experiment or None, args.tracking_uri or None)
    print(json.dumps(result, indent=2))
    return 0


def _common() -> argparse.ArgumentParser:
    """-q, -v and --log-file, accepted by every command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="print warnings and errors only")
    common.add_argument("-v", "--verbose", action="count", default=0, help="also debug lines and MLflow's own")
    common.add_argument("--log-file", metavar="PATH", help="also write the log to PATH (appended)")
    return common


COMMANDS = {  # name: (one line for `cnnlab --help`, what it does and an example for `cnnlab NAME --help`)
    "train": ("train and evaluate one experiment as one MLflow run",
              "Train one experiment, evaluate it on validation and test, and log everything to MLflow: config, "
              "data digests,\nper-epoch metrics, evaluation plots and the model. One line per epoch on stderr; "
              "the result as JSON on stdout.\n\n  cnnlab train fmnist_cnn -P epochs=3\n"
              "  cnnlab train fer_cnn -P variant=model1 -P lr=1e-4\n  cnnlab train fer_best --show-config"),
    "experiments": ("list every experiment, its fields, defaults and allowed values",
                    "Every experiment (preset) with its default for each field that -P sets, the field's type and "
                    "its allowed values.\n\n  cnnlab experiments\n  cnnlab train fer_cnn -P lr=1e-4 --show-config"
                    "    # one experiment, with your values"),
    "tune": ("search hyperparameters with Optuna; resumes; retrains the best",
             "Run (or resume) the Optuna study of a search-space YAML: one MLflow parent run with the trials nested "
             "under it,\nupdated after every trial (best so far, trials table, plots), then the best configuration "
             "retrained and\nevaluated once on test.\n\n  cnnlab tune tuning/fer_cnn_grid.yaml\n"
             "  cnnlab tune tuning/fmnist_cnn.yaml -P limit=2000 --n-trials 6 --no-final"),
    "register": ("register the best run as a model version; champion or challenger",
                 "Make the best FINISHED run (by val_accuracy) of an experiment, or a study's final run, a new "
                 "version of a\nregistered model; `champion` moves only when it is significantly better than the "
                 "current one (McNemar\non both runs' validation predictions), else it is the `challenger`; --force "
                 "overrides.\n\n  cnnlab register fer_cnn\n  cnnlab register --study fer_cnn_grid"),
    "compare": ("is B really better than A? McNemar and a paired bootstrap on the same images",
                "Pair two runs' per-image predictions and test whether their accuracies differ.\n\n"
                "  cnnlab compare RUN_ID_A RUN_ID_B --split test"),
    "reproduce": ("run every experiment of the reports and write claimed vs measured",
                  "Run (or reuse) every experiment of the two reports under one parent run and write the table of "
                  "claimed\nagainst measured figures.\n\n  cnnlab reproduce --quick\n"
                  "  cnnlab reproduce --only fer_grid -P device=cuda"),
    "serve": ("serve a model over REST: MLflow's scoring app behind a guard",
              "Serve a logged or registered model with MLflow's own scoring app behind a small guard: body size, JSON "
              "depth,\nContent-Type, requests in progress (503 + Retry-After) and time-outs; limits are environment "
              "variables\n(serving/README.md). A model that would run code other than this cnnlab's is refused "
              "(--trust-model-code:\ndocs/SECURITY.md). `mlflow models serve` serves the same model without the guard "
              "or the check.\n\n"
              "  cnnlab serve models:/fer_cnn@champion -p 5000\n  cnnlab serve runs:/RUN_ID/model --workers 2"),
    "demo": ("a page to try a served model: photo or webcam, each face's emotion",
             "Serve a page where you upload a photo or use the webcam and see each face boxed with its emotion "
             "and the\nclass probabilities, from a model served by `mlflow models serve`.\n\n"
             "  mlflow models serve -m models:/fer_cnn@champion --env-manager local -p 5000 &\n"
             "  cnnlab demo --model-url http://127.0.0.1:5000"),
    "stack": ("the team stack: PostgreSQL, SeaweedFS S3 and an mlflow server with users",
              "Start, stop or check the team stack (prints its URLs as JSON), rotate its passwords, and manage its "
              "MLflow users.\n\n  cnnlab stack up\n  cnnlab stack user add alice\n  cnnlab stack user add bob --read-only\n"
              "  cnnlab stack rotate optuna"),
    "runs": ("export runs with their models from a store, or import them into this one",
             "Move tracked runs (params, metrics, tags, artifacts, logged models) between MLflow stores, e.g. from a "
             "GPU machine's\nlocal store to this one or the team server; importing twice adds nothing.\n\n"
             "  cnnlab runs export out/ --pack parts/\n  cnnlab runs import parts/"),
    "ensemble": ("several runs' models as one tracked, registrable model (probabilities averaged)",
                 "Average the class probabilities of several runs' models (EMA weights where trained with EMA) and "
                 "track the result as\none run with one logged model, evaluated like any run; register it like one.\n\n"
                 "  cnnlab ensemble RUN_A RUN_B RUN_C --name fer_ensemble\n"
                 "  cnnlab ensemble RUN_A RUN_B -P tta=hflip"),
    "mlproject": ("print the MLproject file that the presets define",
                  "Print the MLproject file generated from the presets.\n\n  cnnlab mlproject > MLproject"),
}


def _train_arguments(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", help="an experiment (listed below; details: cnnlab experiments)")
    p.add_argument("-P", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="set a config field, e.g. -P epochs=3 -P lr=1e-3 (fields: cnnlab experiments)")
    p.add_argument("--params", default="", metavar="'KEY=VALUE ...'",
                   help="the same as -P, space-separated in one argument (for MLproject)")
    p.add_argument("--show-config", action="store_true",
                   help="print the experiment's every field (with your -P values), its type and allowed values; "
                   "train nothing")


def _ensemble_arguments(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="run IDs (their logged models) or models:/ URIs; ensembles "
                   "among them are flattened; all trained on the same split (same split_seed)")
    p.add_argument("--name", default="", help="experiment tag and MLflow experiment of the run, the name to register "
                   "(default: <members' experiment>_ensemble)")
    p.add_argument("-P", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="evaluation settings over the first member's config, e.g. -P tta=tencrop -P data_dir=DIR")


def _reproduce_arguments(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", nargs="?", type=_argument("bool"), const=True, default=False, metavar="BOOL",
                   help="small subsets, 1 epoch, ResNet at 48 px: a smoke check of the whole table")
    p.add_argument("--only", action="append", default=[], metavar="NAME[,NAME]",
                   help="run only these rows (an experiment, or one grid combination like fer_grid/dropout=0.3/lr=0.001)")
    p.add_argument("-P", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="set a config field in every row, e.g. -P device=cuda -P precision=bf16")
    p.add_argument("--out", default="reports", help="folder for reproduce.md / .html / .json (default: reports)")


def _stack_arguments(stack: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--root", default=".cnnlab/stack", help="data, secrets, logs, pids (default: .cnnlab/stack)")
    actions = stack.add_subparsers(dest="action", required=True)
    for action, what in (("up", "start what is not running (first time: passwords, admin, roles)"),
                         ("down", "stop every service (data and secrets stay)"), ("status", "which services answer"),
                         ("rotate", "a new password for database role mlflow or optuna, or a new S3 key"),
                         ("docker-secrets", "the secret files of docker/compose.yaml (missing ones only)")):
        p = actions.add_parser(action, parents=[where, common], help=what)
        if action == "rotate":
            p.add_argument("what", choices=["optuna", "mlflow", "s3"])
        if action == "docker-secrets":
            p.add_argument("folder", nargs="?", default="docker/secrets")
        p.add_argument("--host", default="127.0.0.1",
                       help="address for the MLflow server and PostgreSQL (default 127.0.0.1; SeaweedFS stays there)")
        p.add_argument("--mlflow-port", type=int, default=0, help="0: the port used last time, else a free one")
        p.add_argument("--s3-port", type=int, default=0)
        p.add_argument("--pg-port", type=int, default=0)
        p.add_argument("--workers", type=int, default=1, help="mlflow server worker processes")
        p.set_defaults(func=cmd_stack)
    user = actions.add_parser("user", help="MLflow users: add, passwd, list, remove").add_subparsers(
        dest="user_action", required=True)
    for action, what in (("add", "a new user with a generated password (a teammate unless --read-only)"),
                         ("passwd", "a new generated password (rotation)"), ("remove", "delete the user"),
                         ("list", "users and their access")):
        p = user.add_parser(action, parents=[where, common], help=what)
        p.add_argument("--tracking-uri", default="", help="another server (docker compose's); default: this root's")
        p.add_argument("--admin-credentials", default="", help="its admin's credentials (docker/secrets/admin.env)")
        if action != "list":
            p.add_argument("name")
        if action in ("add", "passwd"):
            p.add_argument("--out", default=None, help="credentials file, mode 0600 (default: ROOT/users/NAME.env)")
        if action == "add":
            p.add_argument("--read-only", action="store_true", help="reads everything, changes nothing of the team's")
            p.add_argument("--worker", action="store_true", help="also the server's and the Optuna storage's URLs and "
                           "password file: `cnnlab tune SPACE --credentials FILE` on any host joins a study")
        p.set_defaults(func=cmd_stack_user)


def _register_arguments(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", nargs="?", default="", help="the experiment to pick from (e.g. fer_cnn)")
    p.add_argument("--study", default="", help="only the study's final run (tags study=STUDY, final=true)")
    p.add_argument("--name", default="", help="registered model name (default: the run's experiment)")
    p.add_argument("--force", nargs="?", type=_argument("bool"), const=True, default=False, metavar="BOOL",
                   help="make it the champion even when not significantly better")


def _tune_arguments(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.add_argument("space", help="search space YAML, e.g. tuning/fer_cnn.yaml")
    p.add_argument("--storage", default="", help="Optuna RDB URL (default: the YAML's, else sqlite:///optuna.db); "
                   "postgresql://USER@HOST/DB for several workers or machines")
    p.add_argument("--study-name", default="", help="default: the YAML's study_name, else its file name")
    p.add_argument("--n-trials", type=_argument("int", least=0), default=0, help="trials the study should have in total (0: the YAML's)")
    p.add_argument("--workers", type=_argument("int", least=0), default=1,
                   help="worker processes on this machine (>1 needs PostgreSQL); one GPU each, from "
                   "CUDA_VISIBLE_DEVICES or all GPUs, never two on one")
    p.add_argument("-P", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a config field in every trial and the final run, e.g. -P limit=300 -P device=cuda")
    p.add_argument("--params", default="", metavar="'KEY=VALUE ...'",
                   help="the same as -P, space-separated in one argument (for MLproject)")
    p.add_argument("--credentials", default="", metavar="FILE",
                   help="a worker's credentials file (`cnnlab stack user add NAME --worker`): the team's MLflow server "
                   "and Optuna storage, with their passwords")
    p.add_argument("--final", nargs="?", type=_argument("bool"), const=True, default=True, metavar="BOOL",
                   help="retrain the best configuration and evaluate it once on test (default: true)")
    p.add_argument("--no-final", dest="final", action="store_false", help="skip the final retrain")


def _serve_arguments(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.add_argument("model_uri", help="e.g. models:/fer_cnn@champion, runs:/RUN_ID/model or a local folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("-p", "--port", type=int, default=5000)
    p.add_argument("-w", "--workers", type=_argument("int", least=1), default=1, help="worker processes (default: 1)")
    p.add_argument("--threads", type=_argument("int", least=0), default=0,
                   help="torch threads per worker (default: cores / workers)")
    p.add_argument("-t", "--timeout", type=_argument("int", least=0), default=0,
                   help="seconds for a request to arrive and be answered (default: 60, or CNNLAB_SERVING_TIMEOUT)")
    p.add_argument("--trust-model-code", action="store_true",
                   help="load the model without checking that it runs only this cnnlab's code (docs/SECURITY.md)")
    p.add_argument("--follow", type=_argument("int", least=0), default=0, metavar="SECONDS",
                   help="re-resolve the alias every SECONDS and serve its new version without a restart")
    p.add_argument("--shadow", default="", metavar="MODEL_URI",
                   help="also run this model (e.g. models:/fer_cnn@challenger) on a sample of traffic, off the "
                        "request path: agreement and latency in /metrics")
    p.add_argument("--shadow-rate", type=float, default=0.05, help="fraction of requests copied (default 0.05)")


def _demo_arguments(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.add_argument("--model-url", default="http://127.0.0.1:5000",
                   help="the model server, `mlflow models serve` (default: http://127.0.0.1:5000)")
    p.add_argument("--host", default="127.0.0.1", help="address the page listens on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="(default: 8080)")
    p.add_argument("--max-body-mb", type=float, default=16, help="largest request forwarded to the model (default: 16)")


def _compare_arguments(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.add_argument("run_a", help="MLflow run ID of model A (e.g. the champion's source run)")
    p.add_argument("run_b", help="MLflow run ID of model B")
    p.add_argument("--split", default="test", help="the evaluated split whose predictions to pair (default: test)")
    p.add_argument("--resamples", type=_argument("int", least=1), help="bootstrap resamples (default: 2000)")
    p.add_argument("--seed", type=_argument("int", least=0), help="bootstrap seed (default: 0)")
    p.add_argument("--alpha", type=float, help="significance level (default: 0.05)")


def _runs_arguments(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    runs = p.add_subparsers(dest="action", required=True)
    e = runs.add_parser("export", parents=[common], help="write the store's runs into a folder; --pack splits it into parts")
    e.add_argument("dest", help="export folder (an existing export there is extended)")
    e.add_argument("--experiment", action="append", default=[], help="only this experiment (repeatable)")
    e.add_argument("--weights-dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="store cnnlab model weights at this precision (fp16/bf16: half the bytes)")
    e.add_argument("--pack", default="", metavar="DIR", help="also write DIR/runs.tgz.001-of-00N parts")
    e.add_argument("--part-mb", type=float, default=15, help="largest part in MiB (default 15)")
    i = runs.add_parser("import", parents=[common], help="import an export (folder, packed parts or tar); already imported runs are skipped")
    i.add_argument("source", help="export folder, one part or the folder of parts, or a .tgz")
    i.add_argument("--experiment", default="", help="put every run into this experiment (default: its own)")
    for q in (e, i):
        q.add_argument("--tracking-uri", default="", help="default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")


ARGUMENTS = {  # command: (what runs it, what adds its arguments)
    "train": (cmd_train, _train_arguments),
    "experiments": (cmd_experiments, None),
    "ensemble": (cmd_ensemble, _ensemble_arguments),
    "reproduce": (cmd_reproduce, _reproduce_arguments),
    "stack": (cmd_stack, _stack_arguments),
    "register": (cmd_register, _register_arguments),
    "tune": (cmd_tune, _tune_arguments),
    "serve": (cmd_serve, _serve_arguments),
    "demo": (cmd_demo, _demo_arguments),
    "mlproject": (cmd_mlproject, None),
    "compare": (cmd_compare, _compare_arguments),
    "runs": (cmd_runs, _runs_arguments),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnnlab", description=__doc__, epilog="`cnnlab COMMAND --help` "
                                     "explains each command with an example.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    common = _common()
    for name, (func, arguments) in ARGUMENTS.items():
        summary, description = COMMANDS[name]
        p = sub.add_parser(name, help=summary, description=description, parents=[common],
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog_from=_train_epilog if name == "train" else None)
        p.set_defaults(func=func)
        if arguments:
            arguments(p, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cnnlab.core import logs

    logs.setup(-1 if args.quiet else args.verbose, args.log_file)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"cnnlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        mlflow_errors = sys.modules.get("mlflow.exceptions")  # not imported: not MLflow's error (cnnlab stack stays fast)
        denied = None
        if mlflow_errors and isinstance(e, mlflow_errors.MlflowException):
            from cnnlab.tracking.runs import access_error
            denied = access_error(f"{e.error_code} {e}")
        if denied is None:
            raise
        print(f"cnnlab {args.command}: error: {denied}", file=sys.stderr)
        return 2
