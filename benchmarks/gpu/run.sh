#!/usr/bin/env bash
# One call on the lent GPU machine: install the wheelhouse, unpack the data, run the jobs tracked, pack the runs.
#   bash benchmarks/gpu/run.sh JOBS.yaml [runner options]      (carry .whl and .gpu; `make gpu-bundle` builds them)
# Back here: cnnlab runs import FILES_AT  (the folder of runs.tgz.NNN-of-NNN).
set -uo pipefail
cd "$(dirname "$0")/../.."
py=${PYTHON:-python3}
out=${OUT:-/tmp/gpu-out}
wheels=${GPU_WHEELS:-.whl}
data=${GPU_DATA:-.gpu/fer2013.tgz}
site=${GPU_SITE:-/tmp/site}
work=${GPU_WORK:-/tmp/gpurun}
t0=$SECONDS
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl \
  || { echo "run.sh: installing $wheels/ failed (carry .whl; build it with make gpu-bundle)"; exit 2; }
export PYTHONPATH="$site:$PWD/src" CNNLAB_CACHE="$work-cache"
if [ -f "$data" ]; then
  mkdir -p "$work-data" && tar -xzf "$data" -C "$work-data" || { echo "run.sh: $data is unreadable"; exit 2; }
  export FER2013_DIR="$work-data/fer2013"
fi
# the commit the tree was copied from, when no .git travelled with it (written by make gpu-bundle)
if ! git rev-parse HEAD >/dev/null 2>&1 && [ -f .gpu/source.env ]; then set -a; . .gpu/source.env; set +a; fi
echo "run.sh: wheels and data ready in $((SECONDS - t0)) s"
exec "$py" benchmarks/gpu/runner.py "$@" --out "$out" --root "$work"
