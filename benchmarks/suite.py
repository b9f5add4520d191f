"""Run named experiment configs in parallel worker processes without MLflow (for a lent GPU machine that has no MLflow).

Each job trains with the platform's own config, loop and evaluation, writes DIR/<job>.json after every epoch
(so a job cut off by a time limit still reports), and the script prints a table at the end.

    python benchmarks/suite.py benchmarks/gpu_jobs.yaml --out /tmp/out --parallel 6 [--quick] [--fit-seconds S]

--fit-seconds S first times two epochs of every job side by side, then caps each job's epochs so that it ends
within S seconds (the schedule is set for the capped count, so a capped job is a complete run, not a cut one).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import yaml


def run_job(name: str, experiment: str, overrides: dict, out: Path, threads: int, probe: bool = False) -> dict:
    import torch

    from cnnlab.augment import batch_augment, tta_views
    from cnnlab.config import build, freeze_schedule, load_data, make_config
    from cnnlab.evaluation import metrics_and_artifacts
    from cnnlab.training import fit, predict

    torch.set_num_threads(threads)
    cfg = make_config(experiment, **overrides)
    cfg.validate()
    start = time.time()
    splits = load_data(cfg)
    model, _ = build(cfg, splits["train"])
    record = {"job": name, "experiment": experiment, "config": dataclasses.asdict(cfg), "history": [],
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    path = out / f"{name}.json"

    def save(epoch: int, metrics: dict) -> None:
        record["history"].append({**metrics, "wall_seconds": time.time() - start})
        path.write_text(json.dumps(record, indent=1))

    history = fit(model, splits["train"], splits["val"], dataclasses.replace(cfg, epochs=cfg.total_epochs()),
                  augment=batch_augment(cfg), epoch_hook=freeze_schedule(cfg), on_epoch_end=save)
    if probe:
        return record
    views = {"": None, "_tta": tta_views(cfg.tta)} if cfg.tta != "none" else {"": None}
    for split in ("val", "test"):
        for suffix, transform in views.items():
            probs = predict(model, splits[split].images, cfg.eval_batch_size, cfg.device, cfg.precision, transform)
            m = metrics_and_artifacts(probs.numpy(), splits[split].labels.numpy(), splits[split].classes,
                                      out / "plots", f"{name}_{split}{suffix}")
            record[f"{split}{suffix}_accuracy"] = m[f"{name}_{split}{suffix}_accuracy"]
    record["wall_seconds"] = time.time() - start
    record["train_images_per_s"] = sum(h["train_images_per_s"] for h in history) / len(history)
    path.write_text(json.dumps(record, indent=1))
    return record


def _worker(args) -> dict:
    name, job, out, threads, quick, probe = args
    overrides = dict(job.get("params", {}))
    if quick:
        overrides.update(epochs=1, limit=300, unfreeze_epochs=min(overrides.get("unfreeze_epochs", 0), 1))
    if probe:
        overrides.update(epochs=2, tta="none")
    try:
        return run_job(name, job["experiment"], overrides, out, threads, probe)
    except Exception as e:  # one failed job must not lose the others' results
        (out / f"{name}.error.txt").write_text(f"{type(e).__name__}: {e}")
        return {"job": name, "error": f"{type(e).__name__}: {e}"}


def fit_epochs(jobs: dict, names: list[str], pool, args) -> None:
    """Time two epochs of every job side by side; lower each job's epochs to what fits in args.fit_seconds."""
    from cnnlab.config import make_config

    probe_dir = args.out / "probe"
    probe_dir.mkdir(exist_ok=True)
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
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 8))
    parser.add_argument("--only", default="", help="comma-separated job names")
    parser.add_argument("--quick", action="store_true", help="1 epoch on 300 images per job: a smoke check")
    parser.add_argument("--fit-seconds", type=float, default=0, help="cap each job's epochs to end within this time")
    args = parser.parse_args()
    jobs = yaml.safe_load(args.jobs.read_text())
    names = [n for n in jobs if not args.only or n in args.only.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    with ctx.Pool(args.parallel) as pool:
        if args.fit_seconds:
            fit_epochs(jobs, names, pool, args)
        results = pool.map(_worker, [(n, jobs[n], args.out, args.threads, args.quick, False) for n in names],
                           chunksize=1)
    print(f"{'job':24} {'epochs':>6} {'val acc':>8} {'test acc':>8} {'test TTA':>8} {'img/s':>8} {'wall s':>7}")
    for r in results:
        if "error" in r:
            print(f"{r['job']:24} error: {r['error']}")
            continue
        tta = r.get("test_tta_accuracy")
        print(f"{r['job']:24} {len(r['history']):6d} {r['val_accuracy']:8.4f} {r['test_accuracy']:8.4f} "
              f"{(f'{tta:.4f}' if tta is not None else '-'):>8} {r['train_images_per_s']:8.0f} {r['wall_seconds']:7.0f}")


if __name__ == "__main__":
    main()
