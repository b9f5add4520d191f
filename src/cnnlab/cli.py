"""`cnnlab <command>`: the only place that parses arguments."""
from __future__ import annotations

import argparse
import json
import sys


def _params(pairs: list[str]) -> dict:
    from .experiments import coerce

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"parameter {pair!r} must be KEY=VALUE")
        key, value = pair.split("=", 1)
        out[key] = coerce(key, value)
    return out


def cmd_train(args) -> int:
    from .experiments import make_config, run

    result = run(make_config(args.experiment, **_params(args.param)))
    print(json.dumps(result, indent=2))
    return 0


def _flag(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1", "yes")


def cmd_reproduce(args) -> int:
    from .reproduce import reproduce

    only = [name for item in args.only for name in item.split(",") if name]
    result = reproduce(quick=args.quick, only=only, overrides=_params(args.param), out=args.out)
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


def _count(text: str) -> int:
    """A count from the command line; MLproject float parameters arrive as "4.0"."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0 or not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(value)


def cmd_tune(args) -> int:
    from .tuning import load_spec, tune

    params = _params(args.param + args.params.split())
    spec = load_spec(args.space, params, storage=args.storage, study_name=args.study_name, n_trials=args.n_trials)
    print(json.dumps(tune(spec, workers=args.workers, final=args.final), indent=2, default=str))
    return 0


def cmd_serve(args) -> int:
    from .serve import serve

    serve(args.model_uri, host=args.host, port=args.port, workers=args.workers, threads=args.threads,
          timeout=args.timeout)
    return 0


def cmd_demo(args) -> int:
    from .demo import serve

    serve(args.model_url, host=args.host, port=args.port, max_body_mb=args.max_body_mb)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnnlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train and evaluate one experiment as one MLflow run")
    p.add_argument("experiment", help="fmnist_cnn, fmnist_mlp, fer_cnn, fer_resnet18, fer_best")
    p.add_argument("-P", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. -P epochs=3 -P lr=1e-3")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("reproduce", help="run every experiment of the reports and write claimed vs measured")
    p.add_argument("--quick", nargs="?", type=_flag, const=True, default=False, metavar="BOOL",
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
    p.add_argument("--n-trials", type=_count, default=0, help="trials the study should have in total (0: the YAML's)")
    p.add_argument("--workers", type=_count, default=1, help="worker processes on this machine (>1 needs PostgreSQL)")
    p.add_argument("-P", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a config field in every trial and the final run, e.g. -P limit=300 -P device=cuda")
    p.add_argument("--params", default="", metavar="'KEY=VALUE ...'",
                   help="the same as -P, space-separated in one argument (for MLproject)")
    p.add_argument("--final", nargs="?", type=_flag, const=True, default=True, metavar="BOOL",
                   help="retrain the best configuration and evaluate it once on test (default: true)")
    p.add_argument("--no-final", dest="final", action="store_false", help="skip the final retrain")
    p.set_defaults(func=cmd_tune)
    p = sub.add_parser("serve", help="serve a model: MLflow's scoring app behind a guard (limits: serving/README.md)")
    p.add_argument("model_uri", help="e.g. models:/fer_cnn@champion, runs:/RUN_ID/model or a local folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("-p", "--port", type=int, default=5000)
    p.add_argument("-w", "--workers", type=_count, default=1, help="worker processes (default: 1)")
    p.add_argument("--threads", type=_count, default=0, help="torch threads per worker (default: cores / workers)")
    p.add_argument("-t", "--timeout", type=_count, default=0,
                   help="seconds for a request to arrive and be answered (default: 60, or CNNLAB_SERVING_TIMEOUT)")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("demo", help="a page to try a served model: upload a photo or use the webcam, see each face's "
                       "emotion and probabilities")
    p.add_argument("--model-url", default="http://127.0.0.1:5000",
                   help="the model server, `mlflow models serve` (default: http://127.0.0.1:5000)")
    p.add_argument("--host", default="127.0.0.1", help="address the page listens on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="(default: 8080)")
    p.add_argument("--max-body-mb", type=float, default=16, help="largest request forwarded to the model (default: 16)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"cnnlab {args.command}: error: {e}", file=sys.stderr)
        return 2
