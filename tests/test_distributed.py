"""Data-parallel training for real: `torchrun --nproc_per_node=2 -m cnnlab train` on CPUs with gloo, against the same
run in one process; a rank killed with kill -9, then the same command resumes the run."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import torch

from cnnlab.core import models
from cnnlab.core.distributed import shard
from cnnlab.tracking import runs

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def train(fmnist_dir: Path, launcher: list[str], **params) -> subprocess.CompletedProcess:
    pairs = [a for k, v in {"data_dir": fmnist_dir, **params}.items() for a in ("-P", f"{k}={v}")]
    return subprocess.run([*launcher, "-m", "cnnlab", "train", "fmnist_cnn", *pairs], capture_output=True, text=True,
                          timeout=600)


def finished_runs() -> list:
    return mlflow.search_runs(experiment_names=["fmnist_cnn"], output_format="list")


def test_ranks_take_equal_disjoint_slices_of_each_global_batch():
    order = torch.randperm(103, generator=torch.Generator().manual_seed(0))
    shards = [shard(order, 8, r, 3) for r in range(3)]
    assert {len(s) for s in shards} == {34}  # the same steps on every rank; 103 % 3 = 1 image dropped
    assert len(torch.cat(shards).unique()) == 102
    for step in range(4):  # step s of all ranks = the single-process batch s of 24 images
        together = torch.cat([s[step * 8: (step + 1) * 8] for s in shards])
        assert torch.equal(together.sort().values, order[step * 24: (step + 1) * 24].sort().values)


@pytest.mark.slow
def test_two_ranks_train_the_weights_of_one_process_with_the_same_global_batch(fmnist_dir):
    # no dropout and no BatchNorm (a batch's statistics would be per rank: SyncBatchNorm needs GPUs): the fer_cnn
    # net on 48 px Fashion-MNIST; 200 training images / 40 a step = 5 steps; fp32, as bf16 rounds per batch size
    same = {"model": "fer_cnn", "image_size": 48, "dropout": 0.0, "limit": 200, "epochs": 1, "optimizer": "sgd",
            "lr": 0.05, "precision": "fp32", "seed": 3}
    ddp = train(fmnist_dir, TORCHRUN, batch_size=20, **same)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    (run,) = finished_runs()  # one MLflow run for both ranks
    assert run.info.status == "FINISHED"
    assert (run.data.params["world_size"], run.data.params["global_batch_size"]) == ("2", "40")
    assert run.data.params["backend"] == "gloo"
    single = train(fmnist_dir, [sys.executable], batch_size=40, **same)
    assert single.returncode == 0, single.stderr[-3000:]
    one = next(r for r in finished_runs() if r.info.run_id != run.info.run_id)

    two_ranks = models.from_bundle(runs.load_bundle(run.info.run_id)).state_dict()
    one_process = models.from_bundle(runs.load_bundle(one.info.run_id)).state_dict()
    assert two_ranks.keys() == one_process.keys()
    for name, weights in one_process.items():
        assert torch.allclose(two_ranks[name], weights, rtol=0, atol=1e-5), name
    for key in ("test_accuracy", "val_accuracy"):
        assert abs(run.data.metrics[key] - one.data.metrics[key]) <= 0.005, key


def rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process | None:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except psutil.Error:
            continue
    return None


@pytest.mark.slow
def test_a_rank_killed_mid_run_then_the_same_command_resumes_the_run(fmnist_dir):
    params = {"limit": 600, "epochs": 3, "batch_size": 32, "seed": 1}
    pairs = [a for k, v in {"data_dir": fmnist_dir, **params}.items() for a in ("-P", f"{k}={v}")]
    cmd = [*TORCHRUN, "-m", "cnnlab", "train", "fmnist_cnn", *pairs]
    launcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not list(Path(".cnnlab/checkpoints").glob("fmnist_cnn-*/last.pt")):
            assert launcher.poll() is None and time.monotonic() < deadline, "no checkpoint of epoch 1"
            time.sleep(0.2)
        rank_process(launcher, 1).send_signal(signal.SIGKILL)  # mid-epoch 2
        assert launcher.wait(timeout=120) != 0  # torchrun stops the other rank and fails
    finally:
        launcher.kill()
        launcher.wait()
    (killed,) = finished_runs()
    assert killed.info.status != "FINISHED"

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)

    assert rerun.returncode == 0, rerun.stderr[-3000:]
    (run,) = finished_runs()  # the same run, not a second one
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert int(run.data.tags["resumed_from_epoch"]) >= 1
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "epoch_seconds")]
    assert sorted(steps) == [1, 2, 3]  # each epoch once: the checkpointed ones carried over, the rest trained
    assert "test_accuracy" in run.data.metrics
