"""Run a list of cnnlab jobs in parallel processes, each tracked into its own MLflow SQLite store, and pack every run
into OUT for `cnnlab runs import` (benchmarks/gpu/run.sh calls it on the lent GPU machine).

    python benchmarks/gpu/runner.py benchmarks/gpu/jobs.yaml --out OUT [--deadline S] [--weights-dtype fp16]
        [--only JOB,JOB] [--quick] [-P KEY=VALUE]

A command naming another job in braces, e.g. `cnnlab ensemble {s0} {s1}` or `cnnlab train fer_best -P teacher={ens}`,
runs after that job, with its runs imported into its own store and {s0} replaced by the ID of s0's model run there.
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
import json
import os
import pkgutil
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from pydantic import Field, StringConstraints, field_validator, model_validator

from cnnlab.core.config import parse_params
from cnnlab.core.logs import table
from cnnlab.core.schema import Strict, read_yaml, validate

REPO = Path(__file__).resolve().parents[2]
NOT_FOR_JOBS = ("cnnlab.__main__", "cnnlab.serving.demo")  # the CLI's entry, and the demo page's server (needs uvicorn)


HEADS = {"cnnlab": [sys.executable, "-m", "cnnlab"], "python": [sys.executable], "python3": [sys.executable]}
PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_.-]+)\}")  # {job}: the run ID of that job's model, in this job's store
TAKES_PARAMS = ("train", "tune", "ensemble", "reproduce")  # the cnnlab commands that take -P (the runner's -P, --quick)
QUICK = {"epochs": "1", "limit": "300"}  # --quick: one epoch on 300 images per job, a smoke check


class JobSpec(Strict):
    """One job: a command line (a string is short for {command: ...}), its threads and time limit."""
    command: str
    threads: int | None = Field(None, ge=1)
    timeout: float | None = Field(None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _short(cls, value):
        return {"command": value} if isinstance(value, str) else value

    @field_validator("command")
    @classmethod
    def _head(cls, text: str) -> str:
        words = shlex.split(text)
        if not words or words[0] not in HEADS:
            raise ValueError(f"start with one of {sorted(HEADS)}")
        return text


class JobFile(Strict):
    """`parallel`, `threads` and `timeout` defaults, and `jobs: {name: command or {command, threads, timeout}}`; a
    command may name other jobs' models as {job}: it runs after them."""
    parallel: int | None = Field(None, ge=1)
    threads: int = Field(2, ge=1)
    timeout: float = Field(600, gt=0)
    jobs: dict[Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]+$")], JobSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _needs(self):
        for name, job in self.jobs.items():
            unknown = sorted(set(PLACEHOLDER.findall(job.command)) - set(self.jobs))
            if unknown:
                raise ValueError(f"job {name} names {unknown} in braces: no such job (known: {sorted(self.jobs)})")
        refuse_circles(self.jobs)
        return self


@dataclass
class Job:
    name: str
    text: str  # the command line as written, {job} placeholders included
    threads: int
    timeout: float
    folder: Path
    needs: list[str] = field(default_factory=list)  # jobs whose models the command names: they run first
    command: list[str] = field(default_factory=list)  # set at start, placeholders replaced
    proc: subprocess.Popen | None = None
    started: float = 0.0
    ended: float = 0.0
    stopping: float = 0.0  # when SIGINT was sent
    status: str = "not started"
    runs: list = field(default_factory=list)
    model_run: str | None = None  # the last run that logged a model: what {name} stands for in other jobs


def refuse_circles(jobs: dict) -> None:
    """Refuse jobs that name each other in a circle."""
    def visit(name: str, path: tuple) -> None:
        if name in path:
            raise ValueError(f"jobs {' -> '.join([*path[path.index(name):], name])} name each other in a circle")
        for need in PLACEHOLDER.findall(jobs[name].command):
            visit(need, (*path, name))
    for name in jobs:
        visit(name, ())


def load_jobs(path: Path, root: Path, only: list[str] | None = None) -> tuple[JobFile, list[Job]]:
    """The job file's jobs (or those in `only`, which must include the jobs they name)."""
    try:
        spec = validate(JobFile, read_yaml(path), path)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    names = [n for n in spec.jobs if not only or n in only]
    if only and set(only) - set(names):
        raise SystemExit(f"{path}: --only names no job {sorted(set(only) - set(names))}")
    jobs = []
    for name in names:
        job = spec.jobs[name]
        needs = list(dict.fromkeys(PLACEHOLDER.findall(job.command)))
        if set(needs) - set(names):
            raise SystemExit(f"{path}: job {name} needs job(s) {sorted(set(needs) - set(names))}: run them too")
        jobs.append(Job(name, job.command, job.threads or spec.threads, job.timeout or spec.timeout,
                        root / "jobs" / name, needs))
    return spec, jobs


def command(text: str, params: dict) -> list[str]:
    """`cnnlab ...` and `python ...` run with this interpreter; arguments naming repo files become absolute; `params`
    go last to the cnnlab commands that take -P (so they win)."""
    words = shlex.split(text)
    rest = [str(REPO / w) if not w.startswith("-") and (REPO / w).exists() else w for w in words[1:]]
    if words[0] == "cnnlab" and rest and rest[0] in TAKES_PARAMS:
        rest += [a for k, v in params.items() for a in ("-P", f"{k}={v}")]
    return HEADS[words[0]] + rest


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


def start(job: Job, env: dict, jobs: dict[str, Job], params: dict) -> None:
    job.folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(job.folder.parents[1] / "template.db", job.folder / "mlflow.db")
    job_env = {**env, "OMP_NUM_THREADS": str(job.threads), "MKL_NUM_THREADS": str(job.threads),
               "MLFLOW_TRACKING_URI": f"sqlite:///{job.folder / 'mlflow.db'}", "PYTHONUNBUFFERED": "1"}
    ids = bring_needs(job, jobs, job_env)
    job.command = command(PLACEHOLDER.sub(lambda m: ids[m[1]], job.text), params)
    with open(job.folder / "log.txt", "a") as log:
        log.write(f"$ {shlex.join(job.command)}\n")
        log.flush()
        job.proc = subprocess.Popen(job.command, cwd=job.folder, env=job_env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
    job.started, job.status = time.time(), "running"
    print(f"[{clock()}] {job.name}: started ({job.threads} threads, {job.timeout:.0f} s limit)", flush=True)


def bring_needs(job: Job, jobs: dict[str, Job], env: dict) -> dict[str, str]:
    """Import the runs of the jobs `job` names into its store (in its folder, where its artifacts go); returns each
    named job's model run ID there. The copies are deleted when the job ends (settle_runs)."""
    from cnnlab.tracking import transfer

    if not job.needs:
        return {}
    folder = job.folder / "needs"
    for name in job.needs:
        transfer.export_runs(folder, f"sqlite:///{jobs[name].folder / 'mlflow.db'}")
    with open(job.folder / "log.txt", "w") as log:
        done = subprocess.run(HEADS["cnnlab"] + ["runs", "import", str(folder)], cwd=job.folder, env=env,
                              stdout=subprocess.PIPE, stderr=log, text=True)
    if done.returncode:
        raise RuntimeError(f"importing the runs of {job.needs} failed (exit {done.returncode}; its log.txt says why)")
    shutil.rmtree(folder)
    ids = json.loads(done.stdout)["runs"]
    return {name: ids[jobs[name].model_run] for name in job.needs}


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
    settle_runs(job)
    print(f"[{clock()}] {job.name}: {job.status} after {job.ended - job.started:.0f} s", flush=True)
    if job.status != "ok":
        lines = (job.folder / "log.txt").read_text(errors="replace").strip().splitlines()
        tail = [line for line in lines if " WARNING " not in line and "Warning:" not in line][-4:]
        print("    " + "\n    ".join(line[:200] for line in tail), flush=True)


def blocker(job: Job, jobs: dict[str, Job]) -> str:
    """Why `job` cannot start: "wait" while a job it names has not ended, a reason if one ended without a model."""
    for need in (jobs[n] for n in job.needs):
        if need.status == "not started" or (need.proc and not need.ended):
            return "wait"
        if need.model_run is None:
            return f"skipped: job {need.name} {need.status} without a model"
    return ""


def run_all(jobs: list[Job], parallel: int, deadline: float, grace: float, env: dict, params: dict) -> None:
    """Start jobs in file order as slots free up (a job naming others once they ended); stop any past its limit."""
    by_name, waiting = {j.name: j for j in jobs}, list(jobs)
    while waiting or any(j.proc and not j.ended for j in jobs):
        now = time.time()
        running = [j for j in jobs if j.proc and not j.ended]
        for job in list(waiting):
            why = blocker(job, by_name)
            if len(running) >= parallel or now >= deadline or why == "wait":
                continue
            waiting.remove(job)
            if why:
                job.status = why
                print(f"[{clock()}] {job.name}: {why}", flush=True)
                continue
            try:
                start(job, env, by_name, params)
            except RuntimeError as e:  # its needs did not come: the others go on
                job.status = f"not started: {e}"
                print(f"[{clock()}] {job.name}: {job.status}", flush=True)
                continue
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
    """Runs a SIGKILL left RUNNING end KILLED; every run is tagged with its job and how the job ended; the runs
    brought from other jobs are deleted (they come back with their own job)."""
    from mlflow import MlflowClient
    from mlflow.entities import RunTag

    from cnnlab.tracking import transfer

    if not (job.folder / "mlflow.db").exists():
        return
    client = MlflowClient(f"sqlite:///{job.folder / 'mlflow.db'}")
    exps = [e.experiment_id for e in client.search_experiments()]
    for run in client.search_runs(exps):
        if transfer.IMPORTED_FROM in run.data.tags:
            client.delete_run(run.info.run_id)
            continue
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, "error", f"runner: job {job.name} {job.status} while this run was running")
            client.set_terminated(run.info.run_id, "KILLED")
        client.log_batch(run.info.run_id, tags=[RunTag("gpu_job", job.name), RunTag("gpu_job_status", job.status)])
    job.runs = client.search_runs(exps, order_by=["attributes.start_time ASC"])
    with_model = {m.source_run_id for m in client.search_logged_models(exps)} if exps else set()
    job.model_run = next((r.info.run_id for r in reversed(job.runs) if r.info.run_id in with_model), None)


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


def job_table(jobs: list[Job]) -> str:
    rows = []
    for job in jobs:
        states = ", ".join(f"{sum(r.info.status == s for r in job.runs)} {s.lower()}" for s in
                           ("FINISHED", "FAILED", "KILLED") if any(r.info.status == s for r in job.runs))
        main = next((r for r in reversed(job.runs) if "test_accuracy" in r.data.metrics),
                    next((r for r in reversed(job.runs) if "val_accuracy" in r.data.metrics), None))
        m = main.data.metrics if main else {}
        wall = f"{job.ended - job.started:.0f}" if job.ended else "-"
        rows.append((job.name, job.status, wall, states or 0, _cell(m, "val_accuracy"), _cell(m, "test_accuracy"),
                     _cell(m, "test_tta_accuracy"), _cell(m, "train_images_per_s", "{:.0f}"),
                     main.info.run_id[:8] if main else "-"))
    return table(rows, ("job", "status", "wall s", "runs", "val acc", "test acc", "test TTA", "train img/s", "run id"))


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
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per job (default: the file's)")
    parser.add_argument("--grace", type=float, default=30, help="seconds from SIGINT to SIGKILL")
    parser.add_argument("--weights-dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--return-mb", type=float, default=63, help="all of OUT (a device call returns 64 MiB)")
    parser.add_argument("--part-mb", type=float, default=15)
    parser.add_argument("--only", default="", help="comma-separated job names (with the jobs they name)")
    parser.add_argument("-P", dest="params", action="append", default=[], metavar="KEY=VALUE",
                        help="set a config field in every cnnlab train|tune|ensemble|reproduce job, e.g. -P width=8")
    parser.add_argument("--quick", action="store_true", help="-P epochs=1 -P limit=300 in every job: a smoke check")
    args = parser.parse_args()
    began = time.time()
    shutil.rmtree(args.root, ignore_errors=True)
    args.root.mkdir(parents=True)
    spec, jobs = load_jobs(args.jobs, args.root, [n for n in args.only.split(",") if n])
    params = {**(QUICK if args.quick else {}), **parse_params(args.params)}
    for job in jobs if args.threads else []:
        job.threads = args.threads
    versions = preflight(args.root)
    print(f"[{clock()}] preflight: {versions}", flush=True)
    parallel = args.parallel or spec.parallel or len(jobs)
    run_all(jobs, parallel, began + args.deadline, args.grace, dict(os.environ), params)
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
    summary = (f"{job_table(jobs)}\n\n{len(parts)} part(s), {size:.1f} MiB, weights {args.weights_dtype}; "
               f"{time.time() - began:.0f} s in all. Here: cnnlab runs import DIR_WITH_PARTS\n" + "\n".join(notes))
    (args.out / "results.md").write_text(summary + "\n")
    print(summary, flush=True)
    sys.exit(0 if all(j.status == "ok" for j in jobs) else 1)


if __name__ == "__main__":
    main()
