#!/usr/bin/env bash
# The GPU recipe end to end on this CPU (`make gpu-check`): a stand-in for the machine's Python (standin.py: only
# the image's packages), the wheelhouse for this Python (3.11 here, 3.12 there, same versions) installed as run.sh
# does, run.sh with tiny CPU jobs (one trains and logs a model, one tunes 2 trials on SQLite storage, one fails, one
# is cut at its time limit), then `cnnlab runs import` here, twice. Needs PyPI (pip download) and FER2013_DIR.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${FER2013_DIR:?set FER2013_DIR}"
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
work=${CHECK_DIR:-$(mktemp -d /tmp/gpu-check.XXXX)}
rm -rf "${work:?}"/* && mkdir -p "$work"
echo "gpu-check: in $work"

"$py" benchmarks/gpu/standin.py "$work/image"
if "$work/image/bin/python" -c "import mlflow" 2>/dev/null; then
  echo "gpu-check: the stand-in imports mlflow without the wheelhouse: not a stand-in" >&2; exit 1
fi
benchmarks/gpu/wheelhouse.sh "$work/whl" "$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"

# a small FER2013 bundle like .gpu/fer2013.tgz: 60 training and 15 test images per emotion
mkdir -p "$work/fer/fer2013"
for split in train:60 test:15; do
  for dir in "$FER2013_DIR/${split%:*}"/*/; do
    dest="$work/fer/fer2013/${split%:*}/$(basename "$dir")"
    mapfile -t files < <(find "$dir" -type f | sort)
    mkdir -p "$dest" && cp -t "$dest" "${files[@]:0:${split#*:}}"
  done
done
tar -czf "$work/fer2013.tgz" -C "$work/fer" fer2013

cat > "$work/jobs.yaml" <<'JOBS'
parallel: 2
threads: 1
timeout: 400
jobs:
  train: cnnlab train fer_cnn -P limit=300 -P epochs=1 -P device=cpu
  tune: cnnlab tune tuning/fer_cnn.yaml -P limit=300 -P epochs=1 -P device=cpu --n-trials 2
  bad_value: cnnlab train fer_cnn -P limit=300 -P optimizer=nope
  cut:
    command: cnnlab train fer_cnn -P limit=300 -P epochs=500 -P device=cpu -P log_model=false
    timeout: 45
JOBS
set +e
OUT="$work/out" PYTHON="$work/image/bin/python" GPU_WHEELS="$work/whl" GPU_DATA="$work/fer2013.tgz" \
  GPU_SITE="$work/site" GPU_WORK="$work/run" bash benchmarks/gpu/run.sh "$work/jobs.yaml" --deadline 600 --part-mb 2
rc=$?
set -e
[ "$rc" = 1 ] || { echo "gpu-check: run.sh exited $rc, expected 1 (two jobs fail on purpose)" >&2; exit 1; }

export MLFLOW_TRACKING_URI="sqlite:///$work/home.db" PYTHONPATH="$PWD/src"
"$py" -m cnnlab runs import "$work/out" > "$work/import1.json"
"$py" -m cnnlab runs import "$work/out" > "$work/import2.json"
"$py" - "$work" <<'PY'
import json, sys
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient

work = Path(sys.argv[1])
first, second = (json.loads((work / f"import{i}.json").read_text()) for i in (1, 2))
client = MlflowClient()
runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
by_job = {}
for r in runs:
    by_job.setdefault(r.data.tags["gpu_job"], []).append(r)
status = {job: sorted(r.info.status for r in rs) for job, rs in by_job.items()}
# tune: study parent, 2 trials, final retrain
expected = {"train": ["FINISHED"], "tune": ["FINISHED"] * 4, "bad_value": ["FAILED"], "cut": ["KILLED"]}
problems = [f"{job}: runs {status.get(job)}, expected {want}" for job, want in expected.items() if status.get(job) != want]
if second["imported"] or second["skipped"] != len(runs) or first["imported"] != len(runs):
    problems.append(f"imports: first {first}, second {second}")
models = {m.source_run_id: m for m in client.search_logged_models([e.experiment_id for e in client.search_experiments()])}
[trained] = by_job["train"]
frame = mlflow.pyfunc.load_model(f"models:/{models[trained.info.run_id].model_id}").predict(np.zeros((2, 48, 48), np.uint8))
if list(frame["label"].map(type)) != [str, str] or len(models) != 2:
    problems.append(f"models: {len(models)} imported, predictions {frame.to_dict()}")
trials = [r for r in by_job["tune"] if "trial_number" in r.data.tags]
if len(trials) != 2 or any("mlflow.parentRunId" not in r.data.tags for r in trials):
    problems.append("tune: trials are not nested under the study run")
if trained.data.tags.get("git_commit") in (None, "", "unknown"):
    problems.append("train: no git commit tagged")
print(json.dumps(status, indent=1))
print("gpu-check: " + ("; ".join(problems) if problems else f"ok: {len(runs)} runs imported once, models load"))
sys.exit(1 if problems else 0)
PY
