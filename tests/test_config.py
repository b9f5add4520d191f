"""Each experiment defined once: MLproject, --help and the benchmark rows derive from the presets and claims.yaml;
the one parser of -P values."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from cnnlab import cli
from cnnlab.core import config, data, models, pipeline
from cnnlab.core.training import TrainConfig
from cnnlab.tracking.reproduce import load_claims
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import common  # noqa: E402 - benchmarks/common.py


def test_committed_mlproject_is_what_the_presets_generate():
    committed = (REPO / "MLproject").read_text()
    assert committed == cli.mlproject(), "MLproject is stale: run `python -m cnnlab mlproject > MLproject`"


def test_every_entry_point_with_its_defaults_is_its_preset():
    entry_points = yaml.safe_load(cli.mlproject())["entry_points"]
    assert set(config.PRESETS) | {"ddp", "tune", "register", "reproduce"} == set(entry_points)
    for name in config.PRESETS:
        params = entry_points[name]["parameters"]
        as_passed = {k: config.parse_value(k, str(p["default"])) for k, p in params.items()}
        assert config.make_config(name, **as_passed) == config.make_config(name), name
        command = " ".join(entry_points[name]["command"].split())
        assert command == f"python -m cnnlab train {name} " + " ".join(f"-P {k}={{{k}}}" for k in params)


def test_train_help_lists_every_experiment_and_dataset_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    for name, preset in config.PRESETS.items():
        assert f"{name:14} {preset.summary}" in out
    assert "classes 3|10" in out and "on_bad error|skip" in out and all(n in out for n in data.names())


def test_benchmark_rows_take_the_reports_figures_from_claims_yaml():
    rows = {r.name: r for e in load_claims() for r in e.rows}
    label, figure, experiment, params = common.claimed("fer_resnet18_scratch", {"image_size": 48})
    assert (label, experiment) == ("fer_resnet18_scratch image_size=48", "fer_resnet18")
    assert figure == f"{rows['fer_resnet18_scratch'].claimed:.2f}% (image_size=224)"  # the claim was at 224 px
    assert params == {**rows["fer_resnet18_scratch"].params, "image_size": 48}
    assert common.claimed("fmnist_cnn", {"schedule": "cosine"})[1] == f"{rows['fmnist_cnn'].claimed:.2f}%"
    assert common.claimed("fmnist_mlp", {})[1] == "-"  # a control: no claim


@pytest.mark.parametrize("name, text, value", [
    ("epochs", "3", 3), ("epochs", "3.0", 3), ("lr", "1e-3", 1e-3), ("permute", "Yes", True),
    ("permute", "0", False), ("classes", "10.0", 10), ("optimizer", "sgd", "sgd"), ("data_dir", "", ""),
])
def test_values_parse_as_their_config_fields(name, text, value):
    parsed = config.parse_value(name, text)
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("pairs, message", [
    (["epochs=ten"], "parameter epochs='ten' is not a valid int"),
    (["epochs=2.5"], "parameter epochs='2.5' is not a valid int"),
    (["permute=maybe"], "parameter permute='maybe' is not a valid bool"),
    (["lr=fast"], "parameter lr='fast' is not a valid float"),
    (["colour=red"], "unknown parameter 'colour'"),
    (["epochs"], "parameter 'epochs' must be KEY=VALUE"),
])
def test_bad_values_name_the_field_and_the_value(pairs, message):
    with pytest.raises(ValueError, match=message):
        config.parse_params(pairs)


def test_command_line_counts_and_flags_use_the_same_parser(capsys):
    parser = cli.build_parser()
    args = parser.parse_args(["tune", "space.yaml", "--n-trials", "4.0", "--final", "no"])
    assert (args.n_trials, args.final) == (4, False)
    assert config.parse_params(["epochs=2", "lr=0.1"]) == {"epochs": 2, "lr": 0.1}
    for argv, message in ((["tune", "s.yaml", "--workers", "-1"], "expected a whole number >= 0, got '-1'"),
                          (["tune", "s.yaml", "--n-trials", "two"], "'two' is not a valid int"),
                          (["reproduce", "--quick", "sure"], "'sure' is not a valid bool")):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        assert message in capsys.readouterr().err


def test_dataset_options_are_config_fields_checked_by_their_dataset():
    assert config.make_config("fmnist_cnn", classes=10).classes == 10
    with pytest.raises(ValueError, match="on_bad must be 'error' or 'skip', got 'sometimes'"):
        config.make_config("fer_cnn", on_bad="sometimes").validate()
    with pytest.raises(ValueError, match="test_split must be 'public' or 'private', got 'train'"):
        config.make_config("fer_cnn", test_split="train").validate()
    with pytest.raises(ValueError, match=r"dataset must be one of \[.*'fer2013', 'fmnist'.*\], got 'mnist'"):
        config.make_config("fmnist_cnn", dataset="mnist").validate()


# Config is built on import from the datasets registered then: a fresh interpreter sees an added dataset option
DIGESTS = """
import dataclasses, json, sys
from cnnlab.core import data
if sys.argv[1] == "added":
    @data.register_dataset("toy_gray", title="toy", size=8, channels=1, options=(data.Option("contrast", float, 1.0),))
    def load_toy_gray(data_dir, contrast):
        raise NotImplementedError
    fer = data.get("fer2013")  # and fer2013 with another on_bad default and one more option
    options = tuple(dataclasses.replace(o, default="skip") if o.name == "on_bad" else o for o in fer.options)
    data._DATASETS["fer2013"] = dataclasses.replace(fer, options=(*options, data.Option("crop", int, 0)))
from cnnlab.core import config
print(json.dumps({e: config.make_config(e).digest() for e in ("fmnist_cnn", "fer_cnn")}))
"""


def digests(datasets: str) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-c", DIGESTS, datasets], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_a_runs_digest_hashes_its_own_datasets_options_not_anothers():
    before, after = digests("registered"), digests("added")
    assert after["fmnist_cnn"] == before["fmnist_cnn"] == config.make_config("fmnist_cnn").digest()
    assert after["fer_cnn"] != before["fer_cnn"]  # its own dataset's new default is part of it
    fmnist = config.make_config("fmnist_cnn")
    assert fmnist.digest() == config.make_config("fmnist_cnn", on_bad="skip").digest()
    assert fmnist.digest() != config.make_config("fmnist_cnn", permute=True).digest()
    assert "on_bad" in config.foreign_options("fmnist") and "permute" not in config.foreign_options("fmnist")


def test_each_model_owns_its_defaults_and_a_preset_says_only_what_differs():
    for name, preset in config.PRESETS.items():
        cfg, owned = config.make_config(name), models.hyperparameters(config.make_config(name).model)
        repeated = {k for k, v in owned.items() if k in preset.settings and preset.settings[k] == v}
        assert not repeated, f"preset {name} repeats its model's defaults {repeated}"
        for k, v in owned.items():
            if hasattr(cfg, k):
                assert getattr(cfg, k) == preset.settings.get(k, v), (name, k)
    mlp = config.make_config("fmnist_cnn", model="mlp")  # another model brings its own defaults along
    assert mlp.dropout == models.defaults("mlp")["dropout"] != config.make_config("fmnist_cnn").dropout
    assert config.make_config("fmnist_mlp", dropout=0.1).dropout == 0.1
    spec = pipeline.model_spec(mlp, 3, 28)  # every argument of the factory, those no config field holds too
    assert set(spec) == {"name", *models.defaults("mlp")} and spec["image_size"] == 28 and spec["dropout"] == 0.2
    assert models.create(**spec)(torch.zeros(2, 1, 28, 28)).shape == (2, 3)


def test_the_loops_fields_are_checked_by_trainconfig_and_configs_choices_extend_its_own():
    with pytest.raises(ValueError, match="weight_decay must be >= 0, got -1.0"):
        TrainConfig(weight_decay=-1.0).validate()
    with pytest.raises(ValueError, match=r"optimizer must be one of \['adam', .*\], got 'lbfgs'"):
        TrainConfig(optimizer="lbfgs").validate()
    fmnist = config.make_config("fmnist_cnn")
    assert TrainConfig().choices().items() <= fmnist.choices().items() and "model" in fmnist.choices()
    with pytest.raises(ValueError, match=r"tta must be one of"):
        config.make_config("fmnist_cnn", tta="sometimes").validate()
