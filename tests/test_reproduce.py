"""`cnnlab reproduce`: the quick table end to end on tiny real subsets, numbers read from MLflow, reuse, errors."""
from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from cnnlab import cli
from cnnlab.tracking import reproduce

TINY = {"limit": 60}
COLUMN = {name: i for i, name in enumerate(reproduce.COLUMNS)}
PROTOCOLS = ("protocols:\n  whole_train: {params: {val_fraction: 0}, says: all of train}\n"
             "  validation: {params: {val_fraction: 0.1}, says: chosen on validation}\n")


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


def _measured(run: mlflow.entities.Run) -> str:
    m = run.data.metrics
    return f"{_pct(m['test_accuracy'])} [{100 * m['test_accuracy_ci_low']:.2f}, {100 * m['test_accuracy_ci_high']:.2f}]"


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
            assert cells[COLUMN["Protocol"]] == entry.protocol
            if row.params.get("weights") == "imagenet" and weights_missing:
                assert result["status"] == "unavailable"
                assert cells[COLUMN["Measured (test) [95% CI]"]] == reproduce.NO_WEIGHTS
                continue
            run = client.get_run(result["run_id"])
            if result["status"] == "reused":  # quick mode makes some rows identical (1 epoch): one run serves both
                assert run.info.run_name in trained  # trained by an earlier row of this call
            else:
                assert result["status"] == "trained" and run.info.run_name == row.name
            assert run.info.status == "FINISHED"
            assert run.data.tags["mlflow.parentRunId"] == first["parent_run_id"]
            assert cells[COLUMN["Measured (test) [95% CI]"]] == _measured(run)
            sizes = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/data_summary.json")["sizes"]
            if entry.grid:  # chosen on validation: a split is held out
                assert float(run.data.params["val_fraction"]) == 0.1 and "val" in sizes
                assert cells[COLUMN["Validation"]] == _pct(run.data.metrics["val_accuracy"])
            else:  # fixed settings: all of train, no validation split, the final epoch tested
                assert float(run.data.params["val_fraction"]) == 0 and "val" not in sizes
                assert "val_accuracy" not in run.data.metrics and cells[COLUMN["Validation"]] == "—"
            assert cells[COLUMN["Epochs"]] == "1"  # quick mode: one epoch
            assert result["run_id"] in cells[COLUMN["Run"]]
            measured.append(row.name)
            trained += [row.name] if result["status"] == "trained" else []
    # 4 Fashion-MNIST, 3 FER CNN, the 9-cell grid, ResNet-18 from scratch (+ the 6 fine-tuning rows when online)
    assert len(measured) == 17 + (0 if weights_missing else 6)
    assert page.count("data:image/png;base64,") == 2 * len(measured)  # confusion matrix and ROC per row

    # each claim beside its measurement; a grid is represented by its best combination on validation
    claimed, diff_column = COLUMN["Claimed"], COLUMN["Difference"]
    assert table["fmnist_cnn"][claimed] == "99.51%" and table["fer_model2"][claimed] == "57.72%"
    diff = 100 * first["results"]["fmnist_cnn"]["test_accuracy"] - 99.51
    assert table["fmnist_cnn"][diff_column] == f"{diff:+.2f} pp"
    grid = next(e for e in entries if e.name == "fer_grid")
    best = max(grid.rows, key=lambda r: client.get_run(first["results"][r.name]["run_id"]).data.metrics["val_accuracy"])
    line = next(cells for label, cells in table.items() if label.startswith("fer_grid: best of 9"))
    assert reproduce._combo(grid, best) in line[0]
    figure = COLUMN["Measured (test) [95% CI]"]
    assert line[claimed] == "57.30%" and line[figure] == table[reproduce._combo(grid, best)][figure]
    assert table["dropout=0.3, lr=0.001"][claimed] == "57.30%"
    assert table["dropout=0.5, lr=0.01"][claimed].startswith("collapsed (24.71% / 42.03%")
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
            assert table2[_label(entry, row)][figure] == table[_label(entry, row)][figure]
    assert md2.count("(reused)") >= len(measured)


def test_a_failing_row_is_reported_and_fails_the_parent_but_not_the_others(data_env, tmp_path, capsys):
    claims = tmp_path / "claims.yaml"
    claims.write_text(
        PROTOCOLS + "rows:\n"
        "  - {name: good, experiment: fmnist_cnn, protocol: whole_train, params: {epochs: 1}, claimed: 99.51, "
        "source: test}\n"
        "  - {name: broken, experiment: fmnist_cnn, protocol: whole_train, source: test, "
        f"params: {{data_dir: '{tmp_path / 'nowhere'}'}}}}\n")
    with pytest.raises(RuntimeError, match=r"1 row\(s\) failed: \['broken'\]"):
        reproduce.reproduce(quick=True, overrides=TINY, out="out", claims=claims)
    md = Path("out/reproduce-quick.md").read_text()
    assert "DataError: Fashion-MNIST IDX files not found" in _table(md)["broken"][COLUMN["Measured (test) [95% CI]"]]
    good = _table(md)["good"]
    parents = mlflow.search_runs(experiment_names=["reproduce"], output_format="list")
    assert [p.info.status for p in parents] == ["FAILED"]
    child = mlflow.search_runs(search_all_experiments=True, output_format="list",
                               filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert [c.info.status for c in child] == ["FINISHED"]
    assert good[COLUMN["Measured (test) [95% CI]"]] == _measured(child[0])


def test_a_run_imported_with_the_same_tags_is_reused_and_its_interval_recomputed(data_env, tmp_path):
    first = reproduce.reproduce(quick=True, only=["fmnist_mlp"], overrides=TINY, out="out")
    client = MlflowClient()
    source = client.get_run(first["results"]["fmnist_mlp"]["run_id"])
    # what `cnnlab runs import` makes of a run tracked on another machine (a GPU's local store): a new run in another
    # experiment with the same tags, params, metrics and artifacts; this one predates logged intervals
    copy = client.create_run(client.create_experiment("imported"), start_time=source.info.start_time,
                             tags={**{k: v for k, v in source.data.tags.items() if not k.startswith("mlflow.")},
                                   "imported_from": source.info.run_id}).info.run_id
    for key, value in {**source.data.params, "device": "cuda"}.items():
        client.log_param(copy, key, value)
    for key in source.data.metrics:
        if "_ci_" not in key:
            for m in client.get_metric_history(source.info.run_id, key):
                client.log_metric(copy, key, m.value, m.timestamp, m.step)
    for artifact in ("data_summary.json", "evaluation/test_predictions.csv"):
        local = mlflow.artifacts.download_artifacts(run_id=source.info.run_id, artifact_path=artifact,
                                                    dst_path=str(tmp_path / "src"))
        client.log_artifact(copy, local, str(Path(artifact).parent) if "/" in artifact else None)
    client.set_terminated(copy, "FINISHED", end_time=source.info.end_time)
    client.delete_run(source.info.run_id)  # the imported copy is the only match left

    result = reproduce.reproduce(quick=True, only=["fmnist_mlp"], overrides=TINY, out="out2")["results"]["fmnist_mlp"]
    assert (result["status"], result["run_id"], result["ci_source"]) == ("reused", copy, "recomputed")
    logged = source.data.metrics
    assert result["ci"] == pytest.approx([logged["test_accuracy_ci_low"], logged["test_accuracy_ci_high"]])
    assert result["test_accuracy"] == logged["test_accuracy"] and result["epochs"] == 1
    assert _table(Path("out2/reproduce-quick.md").read_text())["fmnist_mlp"][COLUMN["Measured (test) [95% CI]"]] \
        == _measured(source)


def _claims(tmp_path: Path, row: str, head: str = PROTOCOLS) -> Path:
    path = tmp_path / "claims.yaml"
    path.write_text(head + "reasons: {split: the test split differs}\nrows:\n  - {name: x, experiment: fer_cnn, "
                    + row + "}\n")
    return path


@pytest.mark.parametrize("row, head, message", [
    ("protocol: whole_train, params: {dropout: 1.5}, source: s", PROTOCOLS,
     r"rows\[0\] \(x\).*dropout must be in \[0, 1\), got 1.5"),
    ("protocol: whole_train, claimed: '57%', source: s", PROTOCOLS,
     r"x\)\.claimed: expected a percentage 0..100, got '57%'"),
    ("protocol: whole_train, params: {lr: fast}, source: s", PROTOCOLS,
     r"\(x\): row x: parameter lr='fast' is not a valid float"),
    ("protocol: whole_train, source: s, epochs: 3", PROTOCOLS, r"unknown field\(s\) \['epochs'\]"),
    ("source: s", PROTOCOLS, r"missing field\(s\) \['protocol'\]"),
    ("protocol: holdout, source: s", PROTOCOLS,
     r"\(x\)\.protocol: 'holdout' is not one of \['validation', 'whole_train'\]"),
    ("protocol: whole_train, grid: {dropout: [0.1, 0.3]}, source: s", PROTOCOLS,
     r"a grid chooses its best on validation, but protocol 'whole_train'"),
    ("protocol: whole_train, explain: [epochs], source: s", PROTOCOLS,
     r"\(x\)\.explain: expected a list of reason ids from \['split'\]"),
    ("protocol: whole_train, source: s", "protocols: {whole_train: {val_fraction: 0}}\n",
     r"protocols.whole_train: expected \{params"),
])
def test_claims_file_errors_name_the_row_and_field(tmp_path, row, head, message):
    with pytest.raises(ValueError, match=message):
        reproduce.load_claims(_claims(tmp_path, row, head))


def test_claims_protocols_and_reasons_become_params_and_texts(tmp_path):
    grid = reproduce.load_claims(_claims(tmp_path, "protocol: validation, params: {lr: 1e-3}, grid: {dropout: [0.1]}, "
                                                   "source: s"))[0]
    assert grid.rows[0].params == {"val_fraction": 0.1, "lr": 0.001, "dropout": 0.1}  # YAML's text 1e-3, typed
    fixed = reproduce.load_claims(_claims(tmp_path, "protocol: whole_train, params: {epochs: 3}, explain: [split], "
                                                    "source: s"))[0]
    assert fixed.rows[0].params == {"val_fraction": 0, "epochs": 3}
    assert fixed.explain == {"split": "the test split differs"}


def test_the_report_marks_the_claim_inside_or_outside_the_interval_and_explains_from_claims(tmp_path):
    claims = tmp_path / "claims.yaml"
    claims.write_text(PROTOCOLS + "reasons: {split: 'test split differs: PublicTest <half> only'}\nrows:\n"
                      "  - {name: near, experiment: fer_cnn, protocol: whole_train, claimed: 57.0, source: s}\n"
                      "  - {name: far, experiment: fer_cnn, protocol: whole_train, claimed: 60.0, explain: [split], "
                      "source: s}\n"
                      "  - {name: unexplained, experiment: fer_cnn, protocol: whole_train, claimed: 52.0, source: s}\n"
                      "  - {name: old, experiment: fer_cnn, protocol: whole_train, claimed: 57.0, source: s}\n")
    entries = reproduce.load_claims(claims)
    run = {"status": "trained", "experiment_id": "1", "run_id": "r", "val_accuracy": None, "epochs": 15,
           "wall_s": 60.0, "test_split": "public", "test_images": 3589, "dataset": "fer2013", "ci_source": "logged"}
    results = {"near": {**run, "test_accuracy": 0.565, "ci": [0.549, 0.581]},
               "far": {**run, "test_accuracy": 0.565, "ci": [0.549, 0.581]},
               "unexplained": {**run, "test_accuracy": 0.565, "ci": [0.549, 0.581]},
               "old": {**run, "test_accuracy": 0.565, "ci": None, "ci_source": None}}
    meta = {"configs": {e.name: reproduce.row_config(e.rows[0], False, {}) for e in entries}, "quick": False,
            "tracking_uri": "sqlite:///mlflow.db", "parent_run_id": "p", "experiment_id": "0", "overrides": {},
            "wall_s": 1.0, "git_commit": "abc", "git_dirty": "false"}
    table = _table(reproduce.render_markdown(entries, results, meta))
    vs, why, measured = COLUMN["Claim vs CI"], COLUMN["Why it differs"], COLUMN["Measured (test) [95% CI]"]
    assert table["near"][measured] == "56.50% [54.90, 58.10]"
    assert (table["near"][vs], table["near"][why]) == ("inside", "—")  # 0.5 points: nothing to explain
    assert (table["far"][vs], table["far"][why]) == ("outside (above)", "split")
    assert (table["unexplained"][vs], table["unexplained"][why]) == ("outside (below)", "not explained")
    assert (table["old"][measured], table["old"][vs]) == ("56.50% [-]", "—")
    md = reproduce.render_markdown(entries, results, meta)
    assert "`split`: test split differs: PublicTest <half> only" in md and "Protocol `whole_train`: all of train" in md
    page = reproduce.render_html(entries, results, meta)  # run "r" has no figures: each says why
    assert "<td>outside (above)</td>" in page and "<td>inside</td>" in page
    assert "PublicTest &lt;half&gt; only" in page  # claims text is escaped in HTML


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
        "exp 3 / run abc (reused)", "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning")
    assert reproduce.run_link(result, {"tracking_uri": "sqlite:///mlflow.db"}) == ("exp 3 / run abc (reused)", None)
