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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnnlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train and evaluate one experiment as one MLflow run")
    p.add_argument("experiment", help="fmnist_cnn, fmnist_mlp, fer_cnn, fer_resnet18, fer_best")
    p.add_argument("-P", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. -P epochs=3 -P lr=1e-3")
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"cnnlab {args.command}: error: {e}", file=sys.stderr)
        return 2
