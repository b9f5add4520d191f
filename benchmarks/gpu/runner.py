"""Run a list of cnnlab jobs in parallel processes, each tracked into its own MLflow SQLite store, and pack every run
into OUT for `cnnlab runs import` (benchmarks/gpu/run.sh calls it on the lent GPU machine).

    python benchmarks/gpu/runner.py benchmarks/gpu/jobs.yaml --out OUT [--deadline S] [--weights-dtype fp16]

Each job runs in ROOT/jobs/NAME (its mlflow.db, mlruns/, optuna.db, checkpoints, log.txt) with its own thread count
and time limit; at its limit, or at the deadline, it gets SIGINT (its runs end KILLED), then SIGKILL. One failed job
loses nothing of the others. OUT receives jobs.tgz (logs, Optuna storages), runs.tgz.NNN-of-NNN (all runs; logged
models while OUT stays within --return-mb, in job-list order: the rest are left out and their runs say so) and
results.md (the table printed last).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import os
import pkgutil
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
NOT_FOR_JOBS = ("cnnlab.__main__", "cnnlab.serving.demo")  # the CLI's entry, and the demo page's server (needs uvicorn)


@dataclass
class Job:
    name: str
    command: list[str]
    threads: int
    timeout: float
    folder: Path
    proc: subprocess.Popen | None = None
    started: float = 0.0
    ended: float = 0.0
    stopping: float = 0.0  # when SIGINT was sent
    status: str = "not started"
    runs: list = field(default_factory=list)


def load_jobs(path: Path, root: Path) -> tuple[dict, list[Job]]:
    """The job file: `parallel`, `threads`, `timeout` defaults and `jobs: {name: command or {command, threads, timeout}}`."""
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec.get("jobs"), dict) or not spec["jobs"]:
        raise SystemExit(f"{path}: needs a `jobs:` mapping of name -> command")
    jobs = []
    for name, job in spec["jobs"].items():
        job = {"command": job} if isinstance(job, str) else dict(job)
        if not str(name).replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise SystemExit(f"{path}: job name {name!r}: use letters, digits, '.', '_' and '-'")
        if "command" not in job:
            raise SystemExit(f"{path}: job {name!r} has no command")
        jobs.append(Job(name, command(job["command"]), int(job.get("threads", spec.get("threads", 2))),
                        float(job.get("timeout", spec.get("timeout", 600))), root / "jobs" / name))
    return spec, jobs


def command(text: str) -> list[str]:
    """`cnnlab ...` and `python ...` run with this interpreter; arguments naming repo files become absolute."""
    words = shlex.split(text)
    head = {"cnnlab": [sys.executable, "-m", "cnnlab"], "python": [sys.executable], "python3": [sys.executable]}
    if words[0] not in head:
        raise SystemExit(f"job command {text!r}: start with cnnlab, python or python3")
    rest = [str(REPO / w) if not w.startswith("-") and (REPO / w).exists() else w for w in words[1:]]
    return head[words[0]] + rest


def preflight(root: Path) -> str:
    """Versions, conflicts between the carried wheels and the image, every cnnlab module imported, an MLflow store and
    an Optuna RDB study for real."""
    problems = requirement_conflicts()
    if problems:  # printed before the imports that they may break
        print("preflight: requirement conflicts (carried wheel needs -> found): " + "; ".join(problems), flush=True)
    import mlflow
    import optuna
    import torch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    line = (f"python {sys.version.split()[0]}, torch {torch.__version__} ({cuda}), mlflow {mlflow.__version__}, "
            f"optuna {optuna.__version__}, protobuf {md.version('protobuf')}")
    import cnnlab
    for module in pkgutil.walk_packages(cnnlab.__path__, "cnnlab."):  # a missing package fails here, not in a job
        if module.name not in NOT_FOR_JOBS:
            importlib.import_module(module.name)
    template = root / "template.db"
    mlflow.MlflowClient(f"sqlite:///{template}").search_experiments()  # creates the schema once, copied per job
    optuna.create_study(storage=f"sqlite:///{root / 'preflight-optuna.db'}").optimize(lambda t: t.suggest_float("x", 0, 1), 1)
    if os.environ.get("FER2013_DIR"):
        from cnnlab.core.data import load_splits
        load_splits("fer2013")  # decode once into the cache that every job reads
    return line


def requirement_conflicts() -> list[str]:
    """Requirements of the carried wheels (on PYTHONPATH's first entry) that an installed version does not meet."""
    from packaging.requirements import Requirement

    site = os.environ.get("PYTHONPATH", "").split(os.pathsep)[0]
    problems = []
    for dist in md.distributions(path=[site]) if site else []:
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = md.version(req.name)
            except md.PackageNotFoundError:
                continue  # optional at run time (gitpython, uvicorn...): the preflight's imports would have failed
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                problems.append(f"{dist.metadata['Name']}: {req} -> {have}")
    return problems


def start(job: Job, env: dict) -> None:
    job.folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(job.folder.parents[1] / "template.db", job.folder / "mlflow.db")
    job_env = {**env, "OMP_NUM_THREADS": str(job.threads), "MKL_NUM_THREADS": str(job.threads),
               "MLFLOW_TRACKING_URI": f"sqlite:///{job.folder / 'mlflow.db'}", "PYTHONUNBUFFERED": "1"}
    with open(job.folder / "log.txt", "w") as log:
        log.write(f"$ {shlex.join(job.command)}\n")
        log.flush()
        job.proc = subprocess.Popen(job.command, cwd=job.folder, env=job_env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
    job.started, job.status = time.time(), "running"
    print(f"[{clock()}] {job.name}: started ({job.threads} threads, {job.timeout:.0f} s limit)", flush=True)


def stop(job: Job, why: str, grace: float) -> None:
    """SIGINT first: KeyboardInterrupt ends the job's MLflow runs KILLED; SIGKILL `grace` seconds later."""
    now = time.time()
    if not job.stopping:
        job.stopping, job.status = now, why
        os.killpg(job.proc.pid, signal.SIGINT)
        print(f"[{clock()}] {job.name}: {why}, interrupted", flush=True)
    elif now - job.stopping > grace:
        os.killpg(job.proc.pid, signal.SIGKILL)


def finish(job: Job) -> None:
    job.ended = time.time()
    rc = job.proc.returncode
    if job.status == "running":
        job.status = "ok" if rc == 0 else f"failed (exit {rc})"
    print(f"[{clock()}] {job.name}: {job.status} after {job.ended - job.started:.0f} s", flush=True)
    if job.status != "ok":
        lines = (job.folder / "log.txt").read_text(errors="replace").strip().splitlines()
        tail = [line for line in lines if " WARNING " not in line and "Warning:" not in line][-4:]
        print("    " + "\n    ".join(line[:200] for line in tail), flush=True)


def run_all(jobs: list[Job], parallel: int, deadline: float, grace: float, env: dict) -> None:
    waiting = list(jobs)
    while waiting or any(j.proc and not j.ended for j in jobs):
        now = time.time()
        running = [j for j in jobs if j.proc and not j.ended]
        while waiting and len(running) < parallel and now < deadline:
            start(job := waiting.pop(0), env)
            running.append(job)
        if now >= deadline:
            waiting.clear()  # not started: the table says so
        for job in running:
            if job.proc.poll() is not None:
                finish(job)
            elif now - job.started > job.timeout:
                stop(job, f"timeout ({job.timeout:.0f} s)", grace)
            elif now >= deadline:
                stop(job, "deadline", grace)
        time.sleep(0.5)


def settle_runs(job: Job) -> None:
    """Runs a SIGKILL left RUNNING end KILLED; every run is tagged with its job and how the job ended."""
    from mlflow import MlflowClient
    from mlflow.entities import RunTag

    if not (job.folder / "mlflow.db").exists():
        return
    client = MlflowClient(f"sqlite:///{job.folder / 'mlflow.db'}")
    exps = [e.experiment_id for e in client.search_experiments()]
    for run in client.search_runs(exps):
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, "error", f"runner: job {job.name} {job.status} while this run was running")
            client.set_terminated(run.info.run_id, "KILLED")
        client.log_batch(run.info.run_id, tags=[RunTag("gpu_job", job.name), RunTag("gpu_job_status", job.status)])
    job.runs = client.search_runs(exps, order_by=["attributes.start_time ASC"])


def export(jobs: list[Job], folder: Path, weights_dtype: str, max_bytes: int) -> list[str]:
    """Every job's store into one export folder. Models are kept in job-list order (then in the order they were
    logged) while they fit in max_bytes; the rest are left out, and their runs say so."""
    from cnnlab.tracking import transfer

    for job in jobs:
        if job.runs:
            transfer.export_runs(folder, f"sqlite:///{job.folder / 'mlflow.db'}", weights_dtype=weights_dtype)
    if not (folder / transfer.MANIFEST).exists():
        return []
    manifest = transfer.read_manifest(folder)
    rank = {job.name: i for i, job in enumerate(jobs)}
    models = sorted(manifest["models"].values(), key=lambda m: (
        rank[manifest["runs"][m["source_run_id"]]["tags"]["gpu_job"]], m["creation_timestamp"]))
    sizes = {m["model_id"]: transfer.folder_bytes(folder / "models" / m["model_id"]) for m in models}
    room = max_bytes - (transfer.folder_bytes(folder) - sum(sizes.values()))
    notes = []
    for model in models:
        size = sizes[model["model_id"]]
        if size <= room:
            room -= size
            continue
        transfer.leave_out_model(folder, model["model_id"], f"over the {max_bytes / 2**20:.0f} MiB return budget")
        job = manifest["runs"][model["source_run_id"]]["tags"]["gpu_job"]
        notes.append(f"left out the model of job {job}, run {model['source_run_id'][:8]} ({size / 2**20:.1f} MiB): "
                     f"over the return budget")
    return notes


def pack_logs(jobs: list[Job], out: Path) -> None:
    with tarfile.open(out / "jobs.tgz", "w:gz") as tar:
        for job in jobs:
            for name in ("log.txt", "optuna.db"):
                if (job.folder / name).exists():
                    tar.add(job.folder / name, arcname=f"{job.name}/{name}")


def table(jobs: list[Job]) -> str:
    rows = ["| job | status | wall s | runs | val acc | test acc | test TTA | train img/s | run id |",
            "|---|---|---|---|---|---|---|---|---|"]
    for job in jobs:
        states = ", ".join(f"{sum(r.info.status == s for r in job.runs)} {s.lower()}" for s in
                           ("FINISHED", "FAILED", "KILLED") if any(r.info.status == s for r in job.runs))
        main = next((r for r in reversed(job.runs) if "test_accuracy" in r.data.metrics),
                    next((r for r in reversed(job.runs) if "val_accuracy" in r.data.metrics), None))
        m = main.data.metrics if main else {}
        wall = f"{job.ended - job.started:.0f}" if job.ended else "-"
        rows.append(f"| {job.name} | {job.status} | {wall} | {states or 0} | {_cell(m, 'val_accuracy')} | "
                    f"{_cell(m, 'test_accuracy')} | {_cell(m, 'test_tta_accuracy')} | "
                    f"{_cell(m, 'train_images_per_s', '{:.0f}')} | {main.info.run_id[:8] if main else '-'} |")
    return "\n".join(rows)


def _cell(metrics: dict, key: str, fmt: str = "{:.4f}") -> str:
    return fmt.format(metrics[key]) if key in metrics else "-"


def clock() -> str:
    return time.strftime("%H:%M:%S")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("jobs", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="where the packed runs, logs and table go")
    parser.add_argument("--root", type=Path, default=Path("/tmp/gpurun"), help="job folders and stores")
    parser.add_argument("--deadline", type=float, default=380, help="seconds from start: stop every job then")
    parser.add_argument("--parallel", type=int, default=0, help="jobs at once (default: the file's, else all)")
    parser.add_argument("--grace", type=float, default=30, help="seconds from SIGINT to SIGKILL")
    parser.add_argument("--weights-dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--return-mb", type=float, default=63, help="all of OUT (a device call returns 64 MiB)")
    parser.add_argument("--part-mb", type=float, default=15)
    args = parser.parse_args()
    began = time.time()
    shutil.rmtree(args.root, ignore_errors=True)
    args.root.mkdir(parents=True)
    spec, jobs = load_jobs(args.jobs, args.root)
    versions = preflight(args.root)
    print(f"[{clock()}] preflight: {versions}", flush=True)
    parallel = args.parallel or int(spec.get("parallel", len(jobs)))
    run_all(jobs, parallel, began + args.deadline, args.grace, dict(os.environ))
    for job in jobs:
        settle_runs(job)
    from cnnlab.tracking import transfer

    args.out.mkdir(parents=True, exist_ok=True)
    pack_logs(jobs, args.out)
    budget = int(args.return_mb * 2**20) - (args.out / "jobs.tgz").stat().st_size - 2**16  # 64 KiB: results.md
    notes = export(jobs, args.root / "export", args.weights_dtype, budget)
    parts = transfer.pack(args.root / "export", args.out, part_bytes=int(args.part_mb * 2**20)) if (
        args.root / "export" / transfer.MANIFEST).exists() else []
    if sum(p.stat().st_size for p in parts) > budget:
        notes.append("the runs' own artifacts exceed the return budget even without models: parts may not come back")
    if len(parts) + 2 > 8:
        notes.append(f"{len(parts) + 2} files in OUT: a device call returns 8 at most (raise --part-mb, lower --return-mb)")
    size = sum(p.stat().st_size for p in parts) / 2**20
    summary = (f"{table(jobs)}\n\n{len(parts)} part(s), {size:.1f} MiB, weights {args.weights_dtype}; "
               f"{time.time() - began:.0f} s in all. Here: cnnlab runs import DIR_WITH_PARTS\n" + "\n".join(notes))
    (args.out / "results.md").write_text(summary + "\n")
    print(summary, flush=True)
    sys.exit(0 if all(j.status == "ok" for j in jobs) else 1)


if __name__ == "__main__":
    main()
