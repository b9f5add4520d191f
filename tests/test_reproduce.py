"""`cnnlab reproduce`: the quick table end to end on tiny real subsets, numbers read from MLflow, reuse, errors."""
from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from cnnlab import cli, reproduce

TINY = {"limit": 60}


def _all_runs() -> dict[str, mlflow.entities.Run]:
    return {r.info.run_id: r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")}


def _table(md: str) -> dict[str, list[str]]:
    """Every table line of the Markdown report by its first cell (header and separator lines left out)."""
    lines = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| Experiment")]
    return {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split(" | ")] for line in lines)}


def _label(entry: reproduce.Entry, row: reproduce.Row) -> str:
    return reproduce._combo(entry, row) if entry.grid else entry.name


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


@pytest.fixture
def data_env(monkeypatch, fer_subset, fmnist_dir):
    """Data folders come from the environment, as for a user: FER2013_DIR and FASHION_MNIST_DIR."""
    monkeypatch.setenv("FER2013_DIR", str(fer_subset))
    monkeypatch.setenv("FASHION_MNIST_DIR", str(fmnist_dir))


def test_quick_reproduction_reports_every_row_from_mlflow_and_reuses_runs(data_env):
    first = reproduce.reproduce(quick=True, overrides=TINY, out="out")
    entries, client = reproduce.load_claims(), MlflowClient()
    md, page = Path(first["markdown"]).read_text(), Path(first["html"]).read_text()
    table = _table(md)

    assert set(first["results"]) == {r.name for e in entries for r in e.rows}
    weights_missing = reproduce.imagenet_error() is not None  # offline with an empty TORCH_HOME: no ImageNet file
    measured, trained = [], []
    for entry in entries:
        for row in entry.rows:
            result, cells = first["results"][row.name], table[_label(entry, row)]
            if row.params.get("weights") == "imagenet" and weights_missing:
                assert result["status"] == "unavailable" and cells[2] == reproduce.NO_WEIGHTS
                continue
            run = client.get_run(result["run_id"])
            if result["status"] == "reused":  # quick mode makes some rows identical (1 epoch): one run serves both
                assert run.info.run_name in trained  # trained by an earlier row of this call
            else:
                assert result["status"] == "trained" and run.info.run_name == row.name
            assert run.info.status == "FINISHED"
            assert run.data.tags["mlflow.parentRunId"] == first["parent_run_id"]
            assert cells[2] == _pct(run.data.metrics["test_accuracy"])
            assert cells[3] == _pct(run.data.metrics["val_accuracy"])
            assert cells[5] == "1"  # quick mode: one epoch
            assert result["run_id"] in cells[7]
            measured.append(row.name)
            trained += [row.name] if result["status"] == "trained" else []
    # 4 Fashion-MNIST, 3 FER CNN, the 9-cell grid, ResNet-18 from scratch (+ the 6 fine-tuning rows when online)
    assert len(measured) == 17 + (0 if weights_missing else 6)
    assert page.count("data:image/png;base64,") == 2 * len(measured)  # confusion matrix and ROC per row

    # each claim beside its measurement; a grid is represented by its best combination on validation
    assert table["fmnist_cnn"][1] == "99.51%" and table["fer_model2"][1] == "57.72%"
    diff = 100 * first["results"]["fmnist_cnn"]["test_accuracy"] - 99.51
    assert table["fmnist_cnn"][4] == f"{diff:+.2f} pp"
    grid = next(e for e in entries if e.name == "fer_grid")
    best = max(grid.rows, key=lambda r: client.get_run(first["results"][r.name]["run_id"]).data.metrics["val_accuracy"])
    line = next(cells for label, cells in table.items() if label.startswith("fer_grid: best of 9"))
    assert reproduce._combo(grid, best) in line[0]
    assert line[1] == "57.30%" and line[2] == table[reproduce._combo(grid, best)][2]
    assert table["dropout=0.3, lr=0.001"][1] == "57.30%"
    assert table["dropout=0.5, lr=0.01"][1].startswith("collapsed (24.71% / 42.03%")
    assert "PublicTest half" in md and (reproduce.NO_WEIGHTS in md) == weights_missing

    parent = client.get_run(first["parent_run_id"])
    child_experiment = client.get_run(first["results"]["fmnist_cnn"]["run_id"]).info.experiment_id
    assert parent.info.status == "FINISHED" and parent.info.experiment_id != child_experiment
    assert parent.data.metrics["rows_trained"] == len(trained) == len({first["results"][n]["run_id"] for n in measured})
    logged = mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="reproduce")
    assert (Path(logged) / "reproduce-quick.md").read_text() == md
    assert (Path(logged) / "reproduce-quick.html").read_text() == page

    # the second call, through the CLI, reuses every run: the only new run is its parent
    before = _all_runs()
    assert cli.main(["reproduce", "--quick", "-P", "limit=60", "--out", "out2"]) == 0
    new = {rid: r for rid, r in _all_runs().items() if rid not in before}
    assert len(new) == 1
    second = next(iter(new.values()))
    assert second.info.run_name == "reproduce-quick" and second.data.metrics["rows_reused"] == len(measured)
    assert set(second.data.tags["reused_rows"].split(",")) == set(measured)
    md2 = Path("out2/reproduce-quick.md").read_text()
    table2 = _table(md2)
    for entry in entries:
        for row in entry.rows:
            assert table2[_label(entry, row)][2] == table[_label(entry, row)][2]
    assert md2.count("(reused)") >= len(measured)


def test_a_failing_row_is_reported_and_fails_the_parent_but_not_the_others(data_env, tmp_path, capsys):
    claims = tmp_path / "claims.yaml"
    claims.write_text(
        "rows:\n"
        "  - {name: good, experiment: fmnist_cnn, params: {epochs: 1}, claimed: 99.51, source: test}\n"
        f"  - {{name: broken, experiment: fmnist_cnn, params: {{data_dir: '{tmp_path / 'nowhere'}'}}, source: test}}\n")
    with pytest.raises(RuntimeError, match=r"1 row\(s\) failed: \['broken'\]"):
        reproduce.reproduce(quick=True, overrides=TINY, out="out", claims=claims)
    md = Path("out/reproduce-quick.md").read_text()
    assert "DataError: Fashion-MNIST IDX files not found" in _table(md)["broken"][2]
    good = _table(md)["good"]
    parents = mlflow.search_runs(experiment_names=["reproduce"], output_format="list")
    assert [p.info.status for p in parents] == ["FAILED"]
    child = mlflow.search_runs(search_all_experiments=True, output_format="list",
                               filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert [c.info.status for c in child] == ["FINISHED"]
    assert good[2] == _pct(child[0].data.metrics["test_accuracy"])


def test_claims_file_errors_name_the_row_and_field(tmp_path):
    bad = tmp_path / "claims.yaml"
    bad.write_text("rows:\n  - {name: x, experiment: fer_cnn, params: {dropout: 1.5}, source: s}\n")
    with pytest.raises(ValueError, match=r"rows\[0\] \(x\).*dropout must be in \[0, 1\), got 1.5"):
        reproduce.load_claims(bad)
    bad.write_text("rows:\n  - {name: x, experiment: fer_cnn, claimed: '57%', source: s}\n")
    with pytest.raises(ValueError, match=r"x\)\.claimed: expected a percentage 0..100, got '57%'"):
        reproduce.load_claims(bad)
    bad.write_text("rows:\n  - {name: x, experiment: fer_cnn, params: {lr: 1e-3}, grid: {dropout: [0.1]}, source: s}\n")
    assert reproduce.load_claims(bad)[0].rows[0].params == {"lr": 0.001, "dropout": 0.1}  # YAML's text 1e-3, typed
    bad.write_text("rows:\n  - {name: x, experiment: fer_cnn, params: {lr: fast}, source: s}\n")
    with pytest.raises(ValueError, match=r"\(x\): row x: parameter lr='fast' is not a valid float"):
        reproduce.load_claims(bad)
    bad.write_text("rows:\n  - {name: x, experiment: fer_cnn, source: s, epochs: 3}\n")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['epochs'\]"):
        reproduce.load_claims(bad)


def test_only_and_quick_shape_the_configs():
    entries = reproduce.load_claims()
    picked = reproduce.select(entries, ["fmnist_cnn", "fer_grid/dropout=0.3/lr=0.001"])
    assert [(e.name, [r.name for r in e.rows]) for e in picked] == [
        ("fmnist_cnn", ["fmnist_cnn"]), ("fer_grid", ["fer_grid/dropout=0.3/lr=0.001"])]
    with pytest.raises(ValueError, match="unknown row.*'fer_gird'"):
        reproduce.select(entries, ["fer_gird"])

    rows = {r.name: r for e in entries for r in e.rows}
    full = reproduce.row_config(rows["fer_resnet18_scratch"], quick=False, overrides={})
    quick = reproduce.row_config(rows["fer_resnet18_scratch"], quick=True, overrides={"device": "cpu"})
    assert (full.image_size, full.limit) == (224, 0)
    assert (quick.image_size, quick.epochs, quick.limit, quick.device) == (48, 1, reproduce.QUICK_LIMIT, "cpu")
    finetune = reproduce.row_config(rows["fer_resnet18_finetune/freeze=layer2"], quick=False, overrides={})
    assert (finetune.weights, finetune.freeze, finetune.unfreeze_epochs) == ("imagenet", "layer2", 10)
    grid = reproduce.row_config(rows["fer_grid/dropout=0.7/lr=0.0001"], quick=False, overrides={})
    assert (grid.dropout, grid.lr, grid.epochs, grid.batch_size, grid.optimizer) == (0.7, 1e-4, 10, 32, "adam")
    with pytest.raises(ValueError, match="row fmnist_cnn: precision must be one of"):
        reproduce.row_config(rows["fmnist_cnn"], quick=True, overrides={"precision": "fp8"})


def test_under_mlflow_run_the_parent_is_its_run_and_rows_nest_in_it(data_env, monkeypatch):
    mlflow.set_experiment("reproduce")
    outer = mlflow.MlflowClient().create_run(mlflow.get_experiment_by_name("reproduce").experiment_id).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", outer)  # what `mlflow run . -e reproduce` hands the command
    result = reproduce.reproduce(quick=True, only=["fmnist_mlp"], overrides=TINY, out="out")
    child = result["results"]["fmnist_mlp"]["run_id"]
    assert result["parent_run_id"] == outer and child != outer
    assert MlflowClient().get_run(child).data.tags["mlflow.parentRunId"] == outer
    assert MlflowClient().get_run(outer).info.status == "FINISHED"


def test_run_link_is_an_address_on_an_http_tracking_server():
    result = {"experiment_id": "3", "run_id": "abc", "status": "reused"}
    assert reproduce.run_link(result, {"tracking_uri": "http://127.0.0.1:5000/"}) == (
        "exp 3 / run abc (reused)", "http://127.0.0.1:5000/#/experiments/3/runs/abc")
    assert reproduce.run_link(result, {"tracking_uri": "sqlite:///mlflow.db"}) == ("exp 3 / run abc (reused)", None)
