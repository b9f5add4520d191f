"""Run named experiment configs in parallel worker processes without MLflow (for a lent GPU machine that has no MLflow).

Each job trains with the platform's own config, loop and evaluation, writes DIR/<job>.json after every epoch
(so a job cut off by a time limit still reports) and its model bundle DIR/<job>.pt at the end, and the script prints
a table at the end.

    python benchmarks/suite.py benchmarks/gpu_jobs.yaml --out /tmp/out --parallel 6 [--quick] [--fit-seconds S] [-P K=V]

A job with `members: [JOB, ...]` evaluates those jobs' models as one ensemble (its params: evaluation settings such
as tta); a job whose `teacher` param names jobs (comma-separated) distills from their models. Such jobs run after the
jobs they name, in a later round.

--fit-seconds S first times two epochs of every training job side by side, then caps each job's epochs so that it
ends within S seconds (the schedule is set for the capped count, so a capped job is a complete run, not a cut one).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import time
from pathlib import Path

import yaml

from cnnlab.core import devices
from cnnlab.core.config import make_config, parse_params, quick_overrides


COLUMNS = {"val": "val_accuracy", "val raw": "val_accuracy_raw", "val TTA": "val_tta_accuracy",
           "test": "test_accuracy", "test raw": "test_accuracy_raw", "test TTA": "test_tta_accuracy",
           "TTA raw": "test_tta_accuracy_raw"}


def run_job(name: str, experiment: str, overrides: dict, out: Path, threads: int, probe: bool = False,
            members: list[str] | None = None) -> dict:
    import torch

    from cnnlab.core import devices, models, pipeline
    from cnnlab.core.config import make_config
    from cnnlab.core.training import Callback

    torch.set_num_threads(threads)
    cfg = make_config(experiment, **overrides)
    start = time.time()
    if members:
        trained = pipeline.ensemble([models.read_bundle(out / f"{m}.pt", source=m) for m in members], cfg)
    else:
        trained = pipeline.prepare(cfg)
    record = {"job": name, "experiment": experiment, "config": dataclasses.asdict(cfg), "history": [],
              "device": devices.device_name(devices.resolve_device(cfg.device)), "tags": trained.tags}
    path = out / f"{name}.json"

    class Save(Callback):
        """Each epoch's metrics into the job's record, with the wall time so far."""

        def on_epoch_end(self, loop, epoch: int, metrics: dict) -> None:
            record["history"].append({**metrics, "wall_seconds": time.time() - start})
            path.write_text(json.dumps(record, indent=1))

    if not members:
        pipeline.train(trained, [Save()])
    if probe:
        return record
    metrics = pipeline.evaluate(trained, out / "evaluation" / name)
    record.update({k: v for k, v in metrics.items() if k in COLUMNS.values() or k == "train_images_per_s"})
    torch.save(trained.bundle(), out / f"{name}.pt")
    record["wall_seconds"] = time.time() - start
    path.write_text(json.dumps(record, indent=1))
    return record


def _worker(args) -> dict:
    name, job, out, threads, quick, probe = args
    overrides = dict(job.get("params", {}))
    try:
        if quick:
            overrides.update(quick_overrides(make_config(job["experiment"], **overrides), limit=300))
        if probe:
            overrides.update(epochs=2, tta="none")
        return run_job(name, job["experiment"], overrides, out, threads, probe, job.get("members"))
    except Exception as e:  # one failed job must not lose the others' results
        (out / f"{name}.error.txt").write_text(f"{type(e).__name__}: {e}")
        return {"job": name, "error": f"{type(e).__name__}: {e}"}


def rounds(jobs: dict, names: list[str], out: Path) -> list[list[str]]:
    """The jobs in rounds: a job that names other jobs (ensemble members, teachers) runs in a round after theirs.
    Teacher job names become the paths of their model bundles."""
    def needs(name: str) -> list[str]:
        teacher = str(jobs[name].get("params", {}).get("teacher", ""))
        return [*jobs[name].get("members", []), *(t for t in teacher.split(",") if t in jobs)]
    depth: dict[str, int] = {}

    def level(name: str, seen: tuple = ()) -> int:
        if name in seen:
            raise ValueError(f"jobs {' -> '.join([*seen, name])} depend on each other in a circle")
        if name not in depth:
            depth[name] = 1 + max((level(n, (*seen, name)) for n in needs(name)), default=-1)
        return depth[name]
    for name in names:
        missing = [n for n in needs(name) if n not in names]
        if missing:
            raise ValueError(f"job {name} needs job(s) {missing}: run them too (--only)")
    levels = [level(n) for n in names]
    for name in names:
        if "members" in jobs[name]:  # the first member's data and settings, with the job's evaluation settings
            first = jobs[jobs[name]["members"][0]]
            params = {k: v for k, v in first.get("params", {}).items() if k != "teacher"}
            params.update(jobs[name].get("params", {}))
            jobs[name] = {"experiment": first["experiment"], **jobs[name], "params": params}
        teacher = jobs[name].get("params", {}).get("teacher")
        if teacher:
            jobs[name]["params"]["teacher"] = ",".join(str(out / f"{t}.pt") if t in jobs else t
                                                       for t in str(teacher).split(","))
    return [[n for n, lv in zip(names, levels) if lv == r] for r in range(max(levels, default=-1) + 1)]


def fit_epochs(jobs: dict, names: list[str], pool, args) -> None:
    """Time two epochs of every job side by side; lower each job's epochs to what fits in args.fit_seconds."""
    from cnnlab.core.config import make_config

    probe_dir = args.out / "probe"
    probe_dir.mkdir(exist_ok=True)
    names = [n for n in names if "members" not in jobs[n] and "teacher" not in jobs[n].get("params", {})]
    probes = pool.map(_worker, [(n, jobs[n], probe_dir, args.threads, args.quick, True) for n in names], chunksize=1)
    for name, probe in zip(names, probes):
        if "error" in probe:
            continue
        params = jobs[name].setdefault("params", {})
        per_epoch = probe["history"][1]["wall_seconds"] - probe["history"][0]["wall_seconds"]
        wanted = params.get("epochs") or make_config(jobs[name]["experiment"]).epochs
        params["epochs"] = max(1, min(int(wanted), int(args.fit_seconds / per_epoch)))
        print(f"{name}: {per_epoch:.2f} s/epoch side by side -> {params['epochs']} of {wanted} epochs", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("jobs", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="per job (default: this machine's threads / --parallel)")
    parser.add_argument("--only", default="", help="comma-separated job names")
    parser.add_argument("--quick", action="store_true", help="1 epoch on 300 images per job: a smoke check")
    parser.add_argument("--fit-seconds", type=float, default=0, help="cap each job's epochs to end within this time")
    parser.add_argument("-P", dest="params", action="append", default=[], metavar="KEY=VALUE",
                        help="set a config field in every job, e.g. -P device=cuda -P data_dir=DIR")
    args = parser.parse_args()
    args.threads = args.threads or devices.threads_per_worker(args.parallel)
    jobs = yaml.safe_load(args.jobs.read_text())
    for job in jobs.values():
        job["params"] = {**job.get("params", {}), **parse_params(args.params)}
    names = [n for n in jobs if not args.only or n in args.only.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    plan = rounds(jobs, names, args.out)
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    results = []
    with ctx.Pool(args.parallel) as pool:
        if args.fit_seconds:
            fit_epochs(jobs, names, pool, args)
        for batch in plan:
            results += pool.map(_worker, [(n, jobs[n], args.out, args.threads, args.quick, False) for n in batch],
                                chunksize=1)
    print(f"{'job':24} {'epochs':>6} " + " ".join(f"{c:>8}" for c in COLUMNS) + f" {'img/s':>8} {'wall s':>7}")
    for r in results:
        if "error" in r:
            print(f"{r['job']:24} error: {r['error']}")
            continue
        figures = " ".join(f"{_figure(r.get(key)):>8}" for key in COLUMNS.values())
        print(f"{r['job']:24} {len(r['history']):6d} {figures} {r.get('train_images_per_s', 0):8.0f} "
              f"{r['wall_seconds']:7.0f}")
    print("val, test: the model a job produced (with ema: the averaged weights); *raw: the weights as trained")


def _figure(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "-"


if __name__ == "__main__":
    main()
