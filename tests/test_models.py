"""Model registry: shapes, the report's parameter count, freezing, ImageNet weights from torchvision's cache."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cnnlab.core import models
from cnnlab.core.preprocess import Classifier, Preprocess


@pytest.mark.parametrize("name, kwargs, size, classes", [
    ("fmnist_cnn", {"num_classes": 3}, 28, 3),
    ("fmnist_cnn", {"num_classes": 10}, 28, 10),
    ("mlp", {"num_classes": 3}, 28, 3),
    ("fer_cnn", {"variant": "model1"}, 48, 7),
    ("fer_cnn", {"variant": "model2"}, 48, 7),
    ("resnet18", {"in_chans": 1}, 48, 7),
    ("resnet18", {"in_chans": 3, "small_input": True}, 48, 7),
    ("vgg_bn", {"width": 16}, 48, 7),
    ("vgg_bn", {"width": 16, "head": "fc"}, 48, 7),
    ("vgg_bn", {"width": 16, "head": "fc"}, 43, 7),  # a ten-crop view
    ("face_mobile", {}, 48, 7),
    ("face_mobile", {"width": 8, "expand": 1, "se": True}, 43, 7),
    ("face_mobile", {"width": 8, "in_chans": 3}, 48, 7),
])
def test_output_shapes(name, kwargs, size, classes):
    net = models.create(name, **kwargs).eval()
    in_chans = kwargs.get("in_chans", 1)
    assert net(torch.randn(4, in_chans, size, size)).shape == (4, classes)


def test_fer_cnn_matches_the_report():
    assert models.count_parameters(models.create("fer_cnn")) == 2_452_999
    probs = models.create("fer_cnn", variant="model1").eval()(torch.randn(3, 1, 48, 48))
    assert torch.allclose(probs.sum(1), torch.ones(3))  # model1 ends in a softmax


def test_face_mobile_width_expand_and_se_change_its_size():
    size = {kw: models.count_parameters(models.create("face_mobile", **dict(kw))) for kw in
            [(("width", 32), ("expand", 1)), (("width", 16), ("expand", 1)), (("width", 16), ("expand", 4)),
             (("width", 16), ("expand", 4), ("se", True))]}
    small, half, wide, se = size.values()
    assert small == 483_943  # the fer_mobile preset's net
    assert half < small / 3 and half < wide < se  # channels ~ width: parameters ~ width^2; expansion, SE add
    blocks = [m for m in models.create("face_mobile", width=8).modules() if isinstance(m, models.InvertedResidual)]
    assert len(blocks) == sum(n for _, _, n in models.FACE_STAGES) and sum(b.residual for b in blocks) == 6
    with pytest.raises(ValueError, match="width >= 4 and expand >= 1, got width=16, expand=0"):
        models.create("face_mobile", expand=0)


def test_unknown_model_and_variant():
    with pytest.raises(ValueError, match="unknown model 'vgg99'"):
        models.create("vgg99")
    with pytest.raises(ValueError, match="variant must be"):
        models.create("fer_cnn", variant="model3")
    with pytest.raises(ValueError, match="head must be one of \\['gap', 'fc'\\], got 'mlp'"):
        models.create("vgg_bn", head="mlp")


def test_preprocess_accepts_uint8_and_float_and_resizes():
    pre = Preprocess(mean=0.5, std=0.25, size=56, channels=3)
    u8 = torch.full((2, 48, 48), 255, dtype=torch.uint8)
    out = pre(u8)
    assert out.shape == (2, 3, 56, 56) and torch.allclose(out, torch.full_like(out, 2.0))
    assert torch.allclose(pre(torch.ones(2, 1, 48, 48)), out)


def test_freezing_freezes_weights_and_batchnorm_stats():
    torch.manual_seed(0)
    net = models.create("resnet18", in_chans=1)
    model = Classifier(Preprocess(0.5, 0.25, 48, 1), net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    model.train()
    models.freeze_resnet(net, "layer2")
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = torch.nn.functional.cross_entropy(model(torch.randint(0, 255, (8, 48, 48), dtype=torch.uint8)),
                                             torch.arange(8) % 7)
    loss.backward()
    opt.step()
    after = net.state_dict()
    for prefix in ("conv1.", "bn1.", "layer1.", "layer2."):
        for k in (k for k in before if k.startswith(prefix)):
            assert torch.equal(before[k], after[k]), k  # weights and running stats unchanged
        assert all(p.grad is None for n, p in net.named_parameters() if n.startswith(prefix))
    assert not torch.equal(before["layer3.0.conv1.weight"], after["layer3.0.conv1.weight"])
    assert not torch.equal(before["layer3.0.bn1.running_mean"], after["layer3.0.bn1.running_mean"])
    models.freeze_resnet(net, "none")
    assert all(p.requires_grad for p in net.parameters())


def imagenet_cache_path() -> Path:
    from torch.hub import get_dir
    from torchvision.models import ResNet18_Weights
    return Path(get_dir()) / "checkpoints" / Path(ResNet18_Weights.IMAGENET1K_V1.url).name


def test_imagenet_weights_load_from_torchvision_cache():
    path = imagenet_cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    from torchvision.models import resnet18
    torch.manual_seed(123)
    reference = resnet18().state_dict()
    torch.save(reference, path)
    try:
        net = models.create("resnet18", weights="imagenet", in_chans=3)
        assert torch.equal(net.layer3[0].conv1.weight, reference["layer3.0.conv1.weight"])
        assert net.fc.out_features == 7
        gray = models.create("resnet18", weights="imagenet", in_chans=1)
        assert torch.allclose(gray.conv1.weight, reference["conv1.weight"].sum(1, keepdim=True))
    finally:
        path.unlink()


def test_imagenet_weights_missing_is_a_clear_error():
    assert not imagenet_cache_path().exists()
    with pytest.raises(RuntimeError, match="ImageNet weights for ResNet-18 are not available"):
        models.create("resnet18", weights="imagenet")


def test_weights_from_a_platform_checkpoint(tmp_path):
    torch.manual_seed(1)
    trained = Classifier(Preprocess(0.5, 0.25, 48, 3), models.create("resnet18", num_classes=7))
    torch.save({"model": trained.state_dict()}, tmp_path / "last.pt")
    net = models.create("resnet18", weights=str(tmp_path / "last.pt"))
    assert torch.equal(net.layer1[0].conv1.weight, trained.net.layer1[0].conv1.weight)
    with pytest.raises(ValueError, match="no-such-file"):
        models.create("resnet18", weights="no-such-file")


def test_depthwise_nets_train_in_channels_last_even_in_fp32_on_a_cpu():
    """oneDNN's depthwise kernels are faster in channels_last (face_mobile 382 against 310 images/s in fp32);
    dense fp32 convs on a CPU stay in the default layout, and CUDA and bf16 always switch."""
    from cnnlab.core.devices import prefers_channels_last

    cpu = torch.device("cpu")
    assert prefers_channels_last(cpu, "fp32", models.create("face_mobile", width=8))
    assert not prefers_channels_last(cpu, "fp32", models.create("fer_cnn"))
    assert prefers_channels_last(cpu, "bf16", models.create("fer_cnn"))
    assert prefers_channels_last(torch.device("cuda"), "fp32")
