"""`cnnlab <command>`: the only place that parses arguments, and the MLproject entry points that call it."""
from __future__ import annotations

import argparse
import json
import sys

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
        from .config import parse_text

        try:
            value = parse_text(kind, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if least is not None and value < least:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {least}, got {text!r}")
        return value
    return parse


def cmd_train(args) -> int:
    from .config import make_config, parse_params
    from .experiments import run

    result = run(make_config(args.experiment, **parse_params(args.param)))
    print(json.dumps(result, indent=2))
    return 0


def cmd_ensemble(args) -> int:
    from .config import parse_params
    from .experiments import ensemble

    result = ensemble(args.runs, args.name, parse_params(args.param))
    print(json.dumps(result, indent=2))
    print(f"cnnlab ensemble: run {result['run_id']} of {len(result['members'])} models; register it with "
          f"`cnnlab register {result['name']}`", file=sys.stderr)
    return 0


def cmd_reproduce(args) -> int:
    from .config import parse_params
    from .reproduce import reproduce

    only = [name for item in args.only for name in item.split(",") if name]
    result = reproduce(quick=args.quick, only=only, overrides=parse_params(args.param), out=args.out)
    print(json.dumps({k: result[k] for k in ("markdown", "html", "parent_run_id")}, indent=2))
    return 0


def cmd_stack(args) -> int:
    from .stack import Stack

    stack = Stack(args.root, mlflow_port=args.mlflow_port, s3_port=args.s3_port, pg_port=args.pg_port,
                  workers=args.workers)
    if args.action == "down":
        stack.down()
    if args.action == "up":
        stack.up()
    status = stack.status()
    print(json.dumps({"status": status, **(stack.urls() if any(status.values()) else {})}, indent=2))
    return 0 if args.action == "down" or all(status.values()) else 1


def cmd_register(args) -> int:
    from .registry import register

    result = register(args.experiment or None, args.study or None, args.name or None)
    print(json.dumps(result, indent=2))
    print(f"cnnlab register: {result['name']} v{result['version']}: {result['reason']}", file=sys.stderr)
    return 0


def cmd_tune(args) -> int:
    from .config import parse_params
    from .tuning import load_spec, tune

    params = parse_params(args.param + args.params.split())
    spec = load_spec(args.space, params, storage=args.storage, study_name=args.study_name, n_trials=args.n_trials)
    print(json.dumps(tune(spec, workers=args.workers, final=args.final), indent=2, default=str))
    return 0


def cmd_demo(args) -> int:
    from .demo import serve

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
    "register": ({"experiment": "", "study": "", "name": ""},
                 "python -m cnnlab register {experiment} --study {study} --name {name}"),
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
    from .config import PRESETS, RUN_PARAMS, make_config

    lines = ["# Generated from the presets in src/cnnlab/config.py: python -m cnnlab mlproject > MLproject",
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
    from . import data
    from .config import PRESETS

    lines = ["experiments:", *(f"  {name:14} {preset.summary}" for name, preset in PRESETS.items()),
             "datasets (-P dataset=NAME) and their options:"]
    for name in data.names():
        options = [o.name + (f" {'|'.join(map(str, o.allowed))}" if o.allowed else "") for o in data.get(name).options]
        lines.append(f"  {name:14} {', '.join(options) or 'none'}")
    return "\n".join(lines)


def cmd_compare(args) -> int:
    from .compare import compare

    options = {"n_resamples": args.resamples, "seed": args.seed, "alpha": args.alpha}
    result = compare(args.run_a, args.run_b, args.split, **{k: v for k, v in options.items() if v is not None})
    print(json.dumps(result, indent=2))
    print(f"cnnlab compare: {result['summary']}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnnlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("train", help="train and evaluate one experiment as one MLflow run", epilog_from=_train_epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", help="a preset of src/cnnlab/config.py (listed below)")
    p.add_argument("-P", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. -P epochs=3 -P lr=1e-3")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("ensemble", help="several runs' models as one tracked, registrable model (probabilities averaged)")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run IDs (their logged models) or models:/ URIs; ensembles "
                   "among them are flattened; all trained on the same split (same split_seed)")
    p.add_argument("--name", default="", help="experiment tag and MLflow experiment of the run, the name to register "
                   "(default: <members' experiment>_ensemble)")
    p.add_argument("-P", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="evaluation settings over the first member's config, e.g. -P tta=tencrop -P data_dir=DIR")
    p.set_defaults(func=cmd_ensemble)
    p = sub.add_parser("reproduce", help="run every experiment of the reports and write claimed vs measured")
    p.add_argument("--quick", nargs="?", type=_argument("bool"), const=True, default=False, metavar="BOOL",
                   help="small subsets, 1 epoch, ResNet at 48 px: a smoke check of the whole table")
    p.add_argument("--only", action="append", default=[], metavar="NAME[,NAME]",
                   help="run only these rows (an experiment, or one grid combination like fer_grid/dropout=0.3/lr=0.001)")
    p.add_argument("-P", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field in every row, e.g. -P device=cuda -P precision=bf16")
    p.add_argument("--out", default="reports", help="folder for reproduce.md / .html / .json (default: reports)")
    p.set_defaults(func=cmd_reproduce)
    p = sub.add_parser("stack", help="the team stack on loopback: PostgreSQL, SeaweedFS S3, mlflow server")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--root", default=".cnnlab/stack", help="data, logs and pid files (default: .cnnlab/stack)")
    p.add_argument("--mlflow-port", type=int, default=0, help="0: the port used last time, else a free one")
    p.add_argument("--s3-port", type=int, default=0)
    p.add_argument("--pg-port", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="mlflow server worker processes")
    p.set_defaults(func=cmd_stack)
    p = sub.add_parser("register", help="register the best run of an experiment or study; champion or challenger")
    p.add_argument("experiment", nargs="?", default="", help="MLflow experiment to pick from (e.g. fer_cnn)")
    p.add_argument("--study", default="", help="only the study's final run (tags study=STUDY, final=true)")
    p.add_argument("--name", default="", help="registered model name (default: the run's experiment tag)")
    p.set_defaults(func=cmd_register)
    p = sub.add_parser("tune", help="Optuna study over one experiment; resumes; final retrain of the best")
    p.add_argument("space", help="search space YAML, e.g. tuning/fer_cnn.yaml")
    p.add_argument("--storage", default="", help="Optuna RDB URL (default: the YAML's, else sqlite:///optuna.db); "
                   "postgresql://USER@HOST/DB for several workers or machines")
    p.add_argument("--study-name", default="", help="default: the YAML's study_name, else its file name")
    p.add_argument("--n-trials", type=_argument("int", least=0), default=0, help="trials the study should have in total (0: the YAML's)")
    p.add_argument("--workers", type=_argument("int", least=0), default=1, help="worker processes on this machine (>1 needs PostgreSQL)")
    p.add_argument("-P", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a config field in every trial and the final run, e.g. -P limit=300 -P device=cuda")
    p.add_argument("--params", default="", metavar="'KEY=VALUE ...'",
                   help="the same as -P, space-separated in one argument (for MLproject)")
    p.add_argument("--final", nargs="?", type=_argument("bool"), const=True, default=True, metavar="BOOL",
                   help="retrain the best configuration and evaluate it once on test (default: true)")
    p.add_argument("--no-final", dest="final", action="store_false", help="skip the final retrain")
    p.set_defaults(func=cmd_tune)
    p = sub.add_parser("demo", help="a page to try a served model: upload a photo or use the webcam, see each face's "
                       "emotion and probabilities")
    p.add_argument("--model-url", default="http://127.0.0.1:5000",
                   help="the model server, `mlflow models serve` (default: http://127.0.0.1:5000)")
    p.add_argument("--host", default="127.0.0.1", help="address the page listens on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="(default: 8080)")
    p.add_argument("--max-body-mb", type=float, default=16, help="largest request forwarded to the model (default: 16)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("mlproject", help="print the MLproject file that the presets define (> MLproject)")
    p.set_defaults(func=cmd_mlproject)
    p = sub.add_parser("compare", help="McNemar's test and a paired bootstrap interval: run B against run A, same images")
    p.add_argument("run_a", help="MLflow run ID of model A (e.g. the champion's source run)")
    p.add_argument("run_b", help="MLflow run ID of model B")
    p.add_argument("--split", default="test", help="the evaluated split whose predictions to pair (default: test)")
    p.add_argument("--resamples", type=_argument("int", least=1), help="bootstrap resamples (default: 2000)")
    p.add_argument("--seed", type=_argument("int", least=0), help="bootstrap seed (default: 0)")
    p.add_argument("--alpha", type=float, help="significance level (default: 0.05)")
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"cnnlab {args.command}: error: {e}", file=sys.stderr)
        return 2
