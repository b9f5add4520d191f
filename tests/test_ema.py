"""The weights' moving average in the one loop (its math, BatchNorm statistics, checkpoints, what is evaluated, logged
and served) and the regularization knobs of long schedules."""
from __future__ import annotations

import mlflow
import pytest
import torch
from torch import nn

from cnnlab.core import config, models, pipeline
from cnnlab.tracking import experiments, runs as tracking
from cnnlab.core.augment import batch_augment
from cnnlab.core.training import EMA, TrainConfig, make_optimizer, param_groups
from crash import Crash, CrashAfter
from support import run_pipeline


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def train_step(net: nn.Module, seed: int) -> None:
    """One real SGD step in train mode: weights move and BatchNorm's running statistics and counter change."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 1, 8, 8, generator=gen) * 3 + 1, torch.randint(0, 3, (16,), generator=gen)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    net.train()
    nn.functional.cross_entropy(net(x), y).backward()
    optimizer.step()


def test_each_update_is_the_warmed_up_lerp_of_weights_and_batchnorm_statistics():
    net = bn_net()
    ema = EMA(net, decay=0.999)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for n in range(3):  # after n updates the decay is min(0.999, (1 + n) / (10 + n)): 0.1, 2/11, 3/12
        train_step(net, seed=n)
        previous = {k: v.clone() for k, v in ema.module.state_dict().items()}
        ema.update(net)
        decay = min(0.999, (1 + n) / (10 + n))
        for key, value in net.state_dict().items():
            got = ema.module.state_dict()[key]
            if value.is_floating_point():  # weights, biases, running mean and variance
                assert not torch.equal(value, before[key])  # the step changed it: the check below means something
                assert torch.allclose(got, decay * previous[key] + (1 - decay) * value, atol=1e-6), key
            else:  # num_batches_tracked is a count: copied
                assert torch.equal(got, value) and got.item() == n + 1
    ema.updates = 10**6
    train_step(net, seed=9)
    previous = ema.module[0].weight.clone()
    ema.update(net)
    assert torch.allclose(ema.module[0].weight, 0.999 * previous + 0.001 * net[0].weight, atol=1e-7)
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    with pytest.raises(ValueError, match="ema decay must be in"):
        EMA(net, 1.0)


def tiny_fer(fer_subset, **overrides) -> config.Config:
    """fer_best shrunk to seconds: width 8 on a few hundred real FER2013 images, fp32 for exact comparisons."""
    settings = dict(data_dir=str(fer_subset), width=8, epochs=2, batch_size=64, tta="flip", precision="fp32")
    return config.make_config("fer_best", **{**settings, **overrides})


def test_the_run_evaluates_logs_and_serves_the_averaged_weights_and_measures_the_trained_ones(fer_subset, tmp_path):
    cfg = tiny_fer(fer_subset, ema=0.9)
    trained = run_pipeline(cfg, tmp_path / "eval")
    assert trained.raw_model is not None and trained.model is not trained.raw_model
    averaged, raw = trained.model.state_dict(), trained.raw_model.state_dict()
    assert not torch.equal(averaged["net.0.weight"], raw["net.0.weight"])
    last = trained.history[-1]
    assert {"val_accuracy", "val_loss", "val_accuracy_raw", "val_loss_raw"} <= set(last)
    metrics = trained.metrics
    assert metrics["val_accuracy"] == pytest.approx(last["val_accuracy"])  # the epoch's EMA figure is the final one
    assert metrics["val_accuracy_raw"] == pytest.approx(last["val_accuracy_raw"])
    labels = trained.splits["test"].labels.numpy()
    assert metrics["test_accuracy"] == pytest.approx((trained.probabilities["test"].argmax(1) == labels).mean())
    assert {"test_accuracy_raw", "val_tta_accuracy_raw", "test_tta_accuracy_raw"} <= set(metrics)

    result = experiments.run(cfg)  # the same config tracked: same seed, same numbers, the averaged model logged
    run = mlflow.get_run(result["run_id"])
    assert run.data.tags["final_weights"] == "ema 0.9"
    assert run.data.metrics["val_accuracy"] == pytest.approx(metrics["val_accuracy"])
    assert run.data.metrics["test_tta_accuracy_raw"] == pytest.approx(metrics["test_tta_accuracy_raw"])
    logged = tracking.load_bundle(result["run_id"])["state_dict"]
    assert all(torch.equal(logged[k], v.cpu()) for k, v in averaged.items())


def test_resuming_a_checkpoint_with_ema_ends_exactly_where_an_uninterrupted_run_does(fer_subset, tmp_path):
    cfg = tiny_fer(fer_subset, ema=0.9, val_fraction=0.1)
    whole = pipeline.prepare(cfg)
    pipeline.train(whole, checkpoint_path=tmp_path / "whole.pt")
    resumed = pipeline.prepare(cfg)
    with pytest.raises(Crash):
        pipeline.train(resumed, [CrashAfter(0)], checkpoint_path=tmp_path / "cut.pt")
    assert "ema" in torch.load(tmp_path / "cut.pt", weights_only=True)
    resumed = pipeline.prepare(cfg)  # a fresh process would start here: the checkpoint holds everything
    pipeline.train(resumed, checkpoint_path=tmp_path / "cut.pt")
    for model in ("model", "raw_model"):
        a, b = getattr(whole, model).state_dict(), getattr(resumed, model).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), model
    timing = ("epoch_seconds", "train_images_per_s")
    assert [{k: v for k, v in h.items() if k not in timing} for h in whole.history] == \
           [{k: v for k, v in h.items() if k not in timing} for h in resumed.history]


def test_random_erasing_probability_and_area_are_config_fields():
    x, y = torch.full((64, 48, 48), 200, dtype=torch.uint8), torch.arange(64) % 7
    erased = {}
    for p in (0.0, 1.0):
        cfg = config.make_config("fer_best", erase_prob=p, erase_area=0.5)
        out, _ = batch_augment(cfg, 7)(x, y, torch.Generator().manual_seed(0))
        erased[p] = (out == 0).flatten(1).float().mean(1)
    assert (erased[0.0] == 0).all()
    assert (erased[1.0] > 0).all() and erased[1.0].max() > 0.25  # boxes up to half the image
    for overrides, message in [({"erase_prob": 1.5}, "erase_prob must be in"), ({"erase_area": 0.01}, "erase_area"),
                               ({"ema": 1.0}, r"ema must be in \[0, 1\)"), ({"weight_decay": -1e-4}, "weight_decay"),
                               ({"mixup": -0.2}, "mixup must be >= 0"),
                               ({"teacher": "run", "distill_alpha": 0.0}, "distill_alpha=0 ignores the teacher"),
                               ({"distill_temperature": 0.0}, "distill_temperature"), ({"split_seed": -2}, "split_seed")]:
        with pytest.raises(ValueError, match=message):
            config.make_config("fer_best", **overrides).validate()


def test_no_weight_decay_on_biases_and_norm_weights_when_asked():
    for wd_norm_bias, norm_decays in ((True, True), (False, False)):
        net = bn_net()
        cfg = TrainConfig(optimizer="sgd", lr=0.1, momentum=0.0, weight_decay=0.5, wd_norm_bias=wd_norm_bias)
        optimizer = make_optimizer(param_groups(net, cfg), cfg)
        for p in net.parameters():
            p.grad = torch.zeros_like(p)  # only weight decay moves the weights
        conv, norm = net[0].weight.clone(), net[1].weight.clone()
        optimizer.step()
        assert torch.allclose(net[0].weight, conv * 0.95)
        assert torch.allclose(net[1].weight, norm * 0.95) == norm_decays and torch.equal(net[1].weight, norm) != norm_decays


def test_the_small_input_resnet18_preset_builds_a_48px_net():
    cfg = config.make_config("fer_resnet18_small")
    cfg.validate()
    net = models.create(**pipeline.model_spec(cfg, 7, 48))
    assert net.conv1.kernel_size == (3, 3) and net.conv1.in_channels == 1 and isinstance(net.maxpool, nn.Identity)
    assert net(torch.zeros(2, 1, 48, 48)).shape == (2, 7)
    assert (cfg.ema, cfg.epochs, cfg.wd_norm_bias) == (0.999, 300, False)
