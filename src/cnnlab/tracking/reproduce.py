"""Reproduce the reports: every experiment in claims.yaml as a nested run under one parent, claimed vs measured.

Numbers in the report are read back from the MLflow runs (an interval missing from an older run is recomputed from
its logged predictions); a row whose config, data digest and git commit tags match a FINISHED run (an imported one
too) is reused instead of retrained.
"""
from __future__ import annotations

import base64
import dataclasses
import functools
import itertools
import json
import logging
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import jinja2
import mlflow
import yaml
from markupsafe import Markup, escape

from cnnlab.tracking import compare, experiments, runs
from cnnlab.core import logs, models, pipeline, stats
from cnnlab.core.config import QUICK_IMAGE_SIZE, QUICK_LIMIT, Config, make_config, parse_value, quick_overrides

log = logging.getLogger(__name__)

CLAIMS = Path(__file__).with_name("claims.yaml")
FIGURES = {"confusion matrix": "evaluation/test_confusion_matrix.png", "ROC": "evaluation/test_roc.png"}
ENTRY_KEYS = {"name", "experiment", "protocol", "explain", "params", "claimed", "source", "stated", "unstated", "grid",
              "cells"}
COLUMNS = ["Experiment", "Protocol", "Claimed", "Measured (test) [95% CI]", "Claim vs CI", "Validation", "Difference",
           "Why it differs", "Epochs", "Wall time", "Run"]
NO_WEIGHTS = "ImageNet weights not available"
EXPLAIN_OVER = 1.5  # points between claimed and measured that need a reason


@dataclass
class Row:
    """One run of the reproduction: a preset, its overrides, and what the report claims for exactly this run."""
    name: str
    experiment: str
    params: dict
    claimed: float | None = None
    claimed_text: str = ""


@dataclass
class Entry:
    """One experiment of a report; a grid entry holds one row per combination and claims its best."""
    name: str
    rows: list[Row]
    claimed: float | None
    source: str
    stated: str
    unstated: list
    grid: dict
    protocol: str = ""
    protocol_says: str = ""
    explain: dict[str, str] = dataclasses.field(default_factory=dict)  # reason id -> text


# ---------------------------------------------------------------------------------------------- claims

def load_claims(path: str | Path = CLAIMS) -> list[Entry]:
    """Parse claims.yaml; errors name the file, the row and the field."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read the claims ({e})") from e
    items = doc.get("rows") if isinstance(doc, dict) else None
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: expected a non-empty list under 'rows'")
    protocols, reasons = _protocols(doc.get("protocols"), path), doc.get("reasons") or {}
    if not isinstance(reasons, dict) or not all(isinstance(v, str) for v in reasons.values()):
        raise ValueError(f"{path}: reasons must map a reason id to its text, got {reasons!r}")
    entries = [_entry(item, f"{path}: rows[{i}]", protocols, reasons) for i, item in enumerate(items)]
    names = [e.name for e in entries] + [r.name for e in entries if e.grid for r in e.rows]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{path}: duplicate row name(s) {duplicates}")
    return entries


def _protocols(protocols, path) -> dict[str, dict]:
    """How entries run: {name: {params: {...}, says: text}}; each named by the entries' `protocol`."""
    if not isinstance(protocols, dict) or not protocols:
        raise ValueError(f"{path}: expected a mapping under 'protocols' (name: {{params: {{...}}, says: text}})")
    for name, p in protocols.items():
        if not isinstance(p, dict) or set(p) != {"params", "says"} or not isinstance(p["params"], dict):
            raise ValueError(f"{path}: protocols.{name}: expected {{params: {{...}}, says: text}}, got {p!r}")
    return protocols


def _entry(item, where: str, protocols: dict, reasons: dict) -> Entry:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a mapping, got {item!r}")
    unknown = sorted(set(item) - ENTRY_KEYS)
    missing = sorted({"name", "experiment", "protocol", "source"} - set(item))
    if unknown or missing:
        raise ValueError(f"{where}: unknown field(s) {unknown}, missing field(s) {missing}")
    where = f"{where} ({item['name']})"
    claimed = _percent(item.get("claimed"), f"{where}.claimed")
    params, grid = item.get("params") or {}, item.get("grid") or {}
    if not isinstance(params, dict) or not isinstance(grid, dict):
        raise ValueError(f"{where}: params and grid must be mappings")
    if item["protocol"] not in protocols:
        raise ValueError(f"{where}.protocol: {item['protocol']!r} is not one of {sorted(protocols)}")
    protocol = protocols[item["protocol"]]
    params = {**protocol["params"], **params}
    explain = item.get("explain") or []
    if not isinstance(explain, list) or set(explain) - set(reasons):
        raise ValueError(f"{where}.explain: expected a list of reason ids from {sorted(reasons)}, got {explain!r}")
    if any(not isinstance(v, list) or not v for v in grid.values()):
        raise ValueError(f"{where}.grid: every key needs a non-empty list of values, got {grid}")
    unstated = item.get("unstated") or []
    if not isinstance(unstated, list) or set(unstated) - {f.name for f in dataclasses.fields(Config)}:
        raise ValueError(f"{where}.unstated: expected a list of config fields, got {unstated!r}")
    rows = _rows(item["name"], item["experiment"], params, grid, item.get("cells") or [], claimed, where)
    for row in rows:
        try:  # YAML reads 1e-3 as text: type every value as its config field
            row.params = {k: parse_value(k, v) if isinstance(v, str) else v for k, v in row.params.items()}
            cfg = make_config(row.experiment, **row.params)
            cfg.validate()
        except ValueError as e:
            raise ValueError(f"{where}: row {row.name}: {e}") from e
        if grid and not cfg.val_fraction:
            raise ValueError(f"{where}: a grid chooses its best on validation, but protocol {item['protocol']!r} "
                             f"leaves no validation split (val_fraction 0)")
    return Entry(item["name"], rows, claimed, item["source"], item.get("stated", ""), unstated, grid,
                 item["protocol"], protocol["says"], {k: reasons[k] for k in explain})


def _rows(name: str, experiment: str, params: dict, grid: dict, cells: list, claimed, where: str) -> list[Row]:
    """One row, or one per grid combination named NAME/key=value/...; `cells` attach per-combination claims."""
    if not grid:
        return [Row(name, experiment, params, claimed)]
    rows = []
    for values in itertools.product(*grid.values()):
        combo = dict(zip(grid, values))
        row = Row(name + "".join(f"/{k}={v}" for k, v in combo.items()), experiment, {**params, **combo})
        for i, cell in enumerate(cells):
            if not isinstance(cell, dict) or not isinstance(cell.get("match"), dict):
                raise ValueError(f"{where}.cells[{i}]: expected {{match: {{...}}, claimed: N or claimed_text: ...}}")
            if all(combo.get(k) == v for k, v in cell["match"].items()):
                row.claimed = _percent(cell.get("claimed"), f"{where}.cells[{i}].claimed")
                row.claimed_text = str(cell.get("claimed_text", ""))
        rows.append(row)
    return rows


def _percent(value, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        raise ValueError(f"{where}: expected a percentage 0..100, got {value!r}")
    return float(value)


def select(entries: list[Entry], only: list[str]) -> list[Entry]:
    """Keep the entries (or single grid rows) named in `only`; all when empty."""
    if not only:
        return entries
    known = {e.name for e in entries} | {r.name for e in entries for r in e.rows}
    unknown = sorted(set(only) - known)
    if unknown:
        raise ValueError(f"unknown row(s) {unknown} for --only; known: {sorted(known)}")
    picked = []
    for e in entries:
        rows = e.rows if e.name in only else [r for r in e.rows if r.name in only]
        if rows:
            picked.append(dataclasses.replace(e, rows=rows))
    return picked


def row_config(row: Row, quick: bool, overrides: dict) -> Config:
    """The row's config: preset + the report's settings, shrunk in quick mode, then the user's overrides."""
    params = dict(row.params)
    if quick:
        params.update(quick_overrides(make_config(row.experiment, **params)))
    try:
        cfg = make_config(row.experiment, **{**params, **overrides, "run_name": row.name})
        cfg.validate()
    except ValueError as e:
        raise ValueError(f"row {row.name}: {e}") from e
    return cfg


# ---------------------------------------------------------------------------------------------- measuring

def find_finished(cfg: Config) -> str | None:
    """A FINISHED run with this config digest, data digest and git commit, whose metrics stand in for a new one."""
    commit = runs.git_info()["git_commit"]
    if commit == "unknown":
        return None
    digest = pipeline.load_data(cfg)["train"].digest  # decoding is cached: this costs a file scan, not a decode
    query = (f"tags.config_digest = '{cfg.digest()}' and tags.dataset_digest = '{digest}' "
             f"and tags.git_commit = '{commit}' and attributes.status = 'FINISHED'")
    found = mlflow.search_runs(search_all_experiments=True, filter_string=query, output_format="list",
                              order_by=["attributes.start_time DESC"])
    found = [r for r in found if "test_accuracy" in r.data.metrics]
    return found[0].info.run_id if found else None


@functools.cache
def imagenet_error() -> str | None:
    """Why the ImageNet weights cannot be loaded, or None when they can (checked once per process)."""
    try:
        models.imagenet_state_dict()
    except RuntimeError as e:
        return str(e)
    return None


def summarize(run_id: str) -> dict:
    """The row's figures, read from its MLflow run."""
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    sizes = mlflow.artifacts.load_dict(f"runs:/{run_id}/data_summary.json")["sizes"]
    return {"run_id": run_id, "experiment_id": run.info.experiment_id,
            "test_accuracy": run.data.metrics["test_accuracy"], "val_accuracy": run.data.metrics.get("val_accuracy"),
            **accuracy_interval(run),
            "epochs": len(client.get_metric_history(run_id, "train_loss")),
            "wall_s": (run.info.end_time - run.info.start_time) / 1000,
            "test_split": run.data.params.get("test_split", ""), "test_images": sizes["test"],
            "dataset": run.data.tags.get("dataset", "")}


def accuracy_interval(run) -> dict:
    """The run's 95% bootstrap interval of test accuracy: logged, else recomputed (same resamples and seed) from its
    per-image predictions; neither for runs logged before both existed."""
    metrics = run.data.metrics
    if "test_accuracy_ci_low" in metrics and "test_accuracy_ci_high" in metrics:
        return {"ci": [metrics["test_accuracy_ci_low"], metrics["test_accuracy_ci_high"]], "ci_source": "logged"}
    try:
        found = compare.run_predictions(run.info.run_id)
    except ValueError:
        return {"ci": None, "ci_source": None}
    ci = stats.classification_intervals(found["labels"], found["predicted"], len(found["classes"]))["accuracy"]
    return {"ci": [ci.low, ci.high], "ci_source": "recomputed"}


def measure(cfg: Config) -> dict:
    """Reuse a matching run or train one (nested under the active parent); a failure is a result, not a crash."""
    try:
        if run_id := find_finished(cfg):
            return {"status": "reused", **summarize(run_id)}
        if cfg.weights == "imagenet" and (reason := imagenet_error()):
            return {"status": "unavailable", "message": NO_WEIGHTS, "detail": reason}
        return {"status": "trained", **summarize(experiments.run(cfg, nested=True)["run_id"])}
    except Exception as e:  # one broken row must not lose the others' hours of training
        return {"status": "failed", "message": f"{type(e).__name__}: {e}"}


def best_row(entry: Entry, results: dict) -> Row | None:
    """The grid's choice: the measured row with the best validation accuracy (test never selects)."""
    measured = [r for r in entry.rows if results[r.name].get("val_accuracy") is not None]
    return max(measured, key=lambda r: results[r.name]["val_accuracy"], default=None)


def reproduce(quick: bool = False, only: list[str] | None = None, overrides: dict | None = None,
              out: str | Path = "reports", claims: str | Path = CLAIMS) -> dict:
    """Run (or reuse) every selected row under one parent run; write and log the Markdown and HTML reports."""
    entries = select(load_claims(claims), list(only or []))
    overrides = dict(overrides or {})
    configs = {r.name: row_config(r, quick, overrides) for e in entries for r in e.rows}  # all checked up front
    git = runs.git_info()
    uri = runs.init_tracking("reproduce")
    t0 = time.perf_counter()
    with runs.tracked_run("reproduce-quick" if quick else "reproduce",
                              tags={"experiment": "reproduce", **git}) as parent:
        params = {"quick": quick, "only": ",".join(only or []), "overrides": json.dumps(overrides, sort_keys=True),
                  "rows": len(configs)}
        logged = mlflow.get_run(parent.info.run_id).data.params  # `mlflow run` logged its own already
        mlflow.log_params({k: v for k, v in params.items() if k not in logged})
        mlflow.log_artifact(str(claims), "reproduce")
        results = {}
        for i, (name, cfg) in enumerate(configs.items(), 1):
            results[name] = measure(cfg)
            log.info("[%d/%d] %s: %s", i, len(configs), name, _status_line(results[name]))
        meta = {"configs": configs, "tracking_uri": uri, "parent_run_id": parent.info.run_id,
                "experiment_id": parent.info.experiment_id, "quick": quick, "overrides": overrides,
                "wall_s": time.perf_counter() - t0, **git}
        paths = _write_and_log(entries, results, meta, Path(out))
        failed = [n for n, r in results.items() if r["status"] == "failed"]
        if failed:
            raise RuntimeError(f"{len(failed)} row(s) failed: {failed}; their errors are in {paths['markdown']}")
    return {**paths, "parent_run_id": parent.info.run_id, "results": results}


def report_path(out: str | Path, quick: bool) -> Path:
    """Where the Markdown report goes; the HTML and JSON lie beside it."""
    return Path(out) / ("reproduce-quick.md" if quick else "reproduce.md")


def _write_and_log(entries: list[Entry], results: dict, meta: dict, out: Path) -> dict:
    by_status = {s: [n for n, r in results.items() if r["status"] == s]
                 for s in ("trained", "reused", "unavailable", "failed")}
    mlflow.set_tag("reused_rows", ",".join(by_status["reused"])[:5000])
    mlflow.log_dict(by_status, "reproduce/rows_by_status.json")
    mlflow.log_metrics({"rows_trained": len(by_status["trained"]), "rows_reused": len(by_status["reused"]),
                        "wall_seconds": meta["wall_s"]})
    for e in entries:
        if (row := best_row(e, results)) is not None:
            mlflow.log_metric(f"test_accuracy.{e.name}", results[row.name]["test_accuracy"])
    out.mkdir(parents=True, exist_ok=True)
    stem = report_path(out, meta["quick"]).with_suffix("")
    paths = {"markdown": stem.with_suffix(".md"), "html": stem.with_suffix(".html"), "json": stem.with_suffix(".json")}
    paths["markdown"].write_text(render_markdown(entries, results, meta))
    paths["html"].write_text(render_html(entries, results, meta))
    configs = {name: dataclasses.asdict(cfg) for name, cfg in meta["configs"].items()}
    paths["json"].write_text(json.dumps({"meta": {**meta, "configs": configs}, "results": results}, indent=2))
    for path in paths.values():
        mlflow.log_artifact(str(path), "reproduce")
    return {k: str(v) for k, v in paths.items()}


# ---------------------------------------------------------------------------------------------- report

def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _status_line(result: dict) -> str:
    if "test_accuracy" in result:
        return f"{result['status']}, test {_pct(result['test_accuracy'])}, run {result['run_id']}"
    return f"{result['status']}: {result['message']}"


def run_link(result: dict, meta: dict) -> tuple[str, str | None]:
    """Text naming the run (experiment and run id) and, on an http tracking server, its UI address."""
    text = f"exp {result['experiment_id']} / run {result['run_id']}"
    text += " (reused)" if result["status"] == "reused" else ""
    return text, runs.ui_address(meta["tracking_uri"], result["experiment_id"], result["run_id"])


def claim_vs_interval(claimed: float | None, ci: list | None) -> str:
    """Where the claimed figure (percent) lies against the measured 95% interval (fractions)."""
    if claimed is None or ci is None:
        return "—"
    low, high = 100 * ci[0], 100 * ci[1]
    return "inside" if low <= claimed <= high else f"outside ({'above' if claimed > high else 'below'})"


def why_it_differs(entry: Entry, claimed: float | None, test: float, meta: dict) -> str:
    """The entry's reasons (ids, explained in the notes) for a measured figure far from the claim."""
    if claimed is None or abs(100 * test - claimed) <= EXPLAIN_OVER:
        return "—"
    if meta["quick"]:
        return "quick smoke check"
    return ", ".join(entry.explain) or "not explained"


def table_row(label: str, entry: Entry, claimed: float | None, claimed_text: str, result: dict, meta: dict) -> list:
    """Cells of one table line; the run cell is (text, href)."""
    claim = f"{claimed:.2f}%" if claimed is not None else (claimed_text or "—")
    if "test_accuracy" not in result:
        return [label, entry.protocol, claim, result["message"], *["—"] * 6, ("—", None)]
    test, ci = result["test_accuracy"], result["ci"]
    measured = _pct(test) + (f" [{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]" if ci else " [-]")
    diff = f"{100 * test - claimed:+.2f} pp" if claimed is not None else "—"
    val = _pct(result["val_accuracy"]) if result["val_accuracy"] is not None else "—"
    return [label, entry.protocol, claim, measured, claim_vs_interval(claimed, ci), val, diff,
            why_it_differs(entry, claimed, test, meta), str(result["epochs"]), logs.duration(result["wall_s"]),
            run_link(result, meta)]


def main_table(entries: list[Entry], results: dict, meta: dict) -> list[list]:
    lines = []
    for e in entries:
        if not e.grid:
            lines.append(table_row(e.name, e, e.claimed, "", results[e.rows[0].name], meta))
            continue
        row = best_row(e, results)
        if row is None:
            first = results[e.rows[0].name]
            lines.append(table_row(f"{e.name}: none of {len(e.rows)} measured", e, e.claimed, "", first, meta))
        else:
            label = f"{e.name}: best of {len(e.rows)} on validation ({_combo(e, row)})"
            lines.append(table_row(label, e, e.claimed, "", results[row.name], meta))
    return lines


def grid_table(entry: Entry, results: dict, meta: dict) -> list[list]:
    return [table_row(_combo(entry, r), entry, r.claimed, r.claimed_text, results[r.name], meta) for r in entry.rows]


def _combo(entry: Entry, row: Row) -> str:
    return ", ".join(f"{k}={row.params[k]}" for k in entry.grid)


def notes(entries: list[Entry], results: dict, meta: dict, cited: set[str]) -> list[str]:
    lines = [(f"Measured = the `test_accuracy` metric of each row's MLflow run with its {stats.LEVEL:.0%} bootstrap "
              f"interval ({stats.RESAMPLES:,} resamples of the test images, BCa, seeded): the run's "
              f"`test_accuracy_ci_low/high`, else recomputed from its `{compare.predictions_path()}`, else [-]. "
              f"Claim vs CI: whether the claimed figure lies inside that interval. Validation = `val_accuracy`, "
              f"only where the protocol keeps a validation split; difference in percentage points. A grid is compared "
              f"through its best combination on validation accuracy: the test split never selects.")]
    protocols = {e.protocol: e.protocol_says for e in entries}
    lines += [f"Protocol `{name}`: {says}." for name, says in protocols.items()]
    recomputed = [n for n, r in results.items() if r.get("ci_source") == "recomputed"]
    if recomputed:
        lines.append(f"Intervals recomputed from logged predictions (runs from before intervals were logged): "
                     f"{', '.join(recomputed)}.")
    reasons = {k: v for e in entries for k, v in e.explain.items() if k in cited}
    if reasons:
        lines.append(f"Why it differs (cited where measured and claimed are more than {EXPLAIN_OVER} points apart): "
                     + "; ".join(f"`{k}`: {v}" for k, v in reasons.items()) + ".")
    fer = sorted({(r["test_split"], r["test_images"]) for r in results.values() if r.get("dataset") == "fer2013"})
    for split, n in fer:
        half = {"public": "the PublicTest half of FER2013's original test set (the folder layout's test/)",
                "private": "the PrivateTest half of FER2013's original test set"}.get(split, f"test split {split!r}")
        lines.append(f"FER2013 rows are tested on {half}: {n:,} images in these runs. The original test set has "
                     f"7,178 images in two halves (PublicTest, PrivateTest); the report may have used another split.")
    if meta["quick"]:
        lines.append(f"QUICK smoke check: 1 epoch, at most {QUICK_LIMIT} training images (unless overridden), "
                     f"ResNet at {QUICK_IMAGE_SIZE} px. These numbers show the pipeline runs, "
                     f"not whether the claims hold.")
    if meta["overrides"]:
        lines.append(f"Overrides applied to every row: `{json.dumps(meta['overrides'], sort_keys=True)}`.")
    reused = [n for n, r in results.items() if r["status"] == "reused"]
    lines.append(f"Reused from earlier FINISHED runs (same config digest, data digest and git commit): "
                 f"{', '.join(reused) if reused else 'none'}.")
    details = {r.get("detail") for r in results.values() if r["status"] == "unavailable"}
    lines += [f"{NO_WEIGHTS}: {d}" for d in details if d]
    for e in entries:
        cfg = meta["configs"][e.rows[0].name]
        used = ", ".join(f"{k}={getattr(cfg, k)}" for k in e.unstated)
        unstated = f" Not stated by the report, used here: {used}." if used else ""
        lines.append(f"`{e.name}` ({e.source}): {e.stated}.{unstated}")
    return lines


def _header(meta: dict) -> str:
    dirty = " (uncommitted changes)" if meta.get("git_dirty") == "true" else ""
    return (f"Tracking URI `{meta['tracking_uri']}`, parent run `{meta['parent_run_id']}` "
            f"(experiment id {meta['experiment_id']}), git commit `{meta['git_commit'][:12]}`{dirty}, "
            f"{'quick' if meta['quick'] else 'full'} mode, total wall time {logs.duration(meta['wall_s'])}.")


@functools.cache
def _templates() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("cnnlab.tracking"), undefined=jinja2.StrictUndefined,
                             autoescape=jinja2.select_autoescape(["html.j2"]), trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    env.filters.update(md_cell=_md_cell, html_cell=_html_cell, prose=_prose)
    return env


def _md_cell(cell) -> str:
    text, href = cell if isinstance(cell, tuple) else (cell, None)
    text = str(text).replace("|", "\\|").replace("\n", " ")
    return f"[{text}]({href})" if href else text


def _html_cell(cell) -> Markup:
    text, href = cell if isinstance(cell, tuple) else (cell, None)
    return Markup('<a href="{}">{}</a>').format(href, text) if href else escape(str(text))


def _prose(text: str) -> Markup:
    """Markdown's `code` spans, the only markup the notes use, as HTML."""
    return Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", str(escape(text))))


def _context(entries: list[Entry], results: dict, meta: dict) -> dict:
    main = main_table(entries, results, meta)
    grids = [(e.name, grid_table(e, results, meta)) for e in entries if e.grid]
    why = COLUMNS.index("Why it differs")
    cited = {r.strip() for line in main + [g for _, lines in grids for g in lines] for r in line[why].split(",")}
    return {"columns": COLUMNS, "header": _header(meta), "main": main, "grids": grids,
            "notes": notes(entries, results, meta, cited)}


def render_markdown(entries: list[Entry], results: dict, meta: dict) -> str:
    return _templates().get_template("reproduce.md.j2").render(_context(entries, results, meta))


def render_html(entries: list[Entry], results: dict, meta: dict) -> str:
    """One self-contained page: the tables, notes, and each run's test confusion matrix and ROC as inline PNGs."""
    figures = [(name, figures_of(result["run_id"])) for name, result in results.items() if "run_id" in result]
    return _templates().get_template("reproduce.html.j2").render(_context(entries, results, meta), figures=figures)


def figures_of(run_id: str) -> list[tuple[str, str | None, str]]:
    """(title, base64 PNG or None, why not) of the run's logged test figures, downloaded from its artifacts."""
    out = []
    with tempfile.TemporaryDirectory(prefix="cnnlab-report-") as tmp:
        for title, path in FIGURES.items():
            try:
                local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp)
            except Exception as e:  # an old run without the figure still gets its table row
                out.append((title, None, type(e).__name__))
                continue
            out.append((title, base64.b64encode(Path(local).read_bytes()).decode(), ""))
    return out
