#!/usr/bin/env bash
# Everything a call on the lent GPU machine carries, built here: `make gpu-bundle`.
#   .whl/                the wheels the machine lacks (make wheelhouse; rebuilt when requirements.txt changes)
#   .gpu/fer2013.tgz     FER2013 from $FER2013_DIR (train/ and test/, or fer2013.csv), as the folder fer2013/
#   .gpu/source.env      the commit (and dirty flag) of this tree, for runs tracked where no .git travels
# Prints what travels and the device command. Run it right before the call: source.env follows the commit.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${FER2013_DIR:?set FER2013_DIR to the FER2013 folder (train/ test/ or fer2013.csv)}"
mkdir -p .gpu
if [ ! -f .whl/.built ] || [ benchmarks/gpu/requirements.txt -nt .whl/.built ]; then
  benchmarks/gpu/wheelhouse.sh .whl 3.12 && touch .whl/.built
fi
if [ ! -f .gpu/fer2013.tgz ]; then
  members=(train test)
  [ -f "$FER2013_DIR/fer2013.csv" ] && members=(fer2013.csv)
  tar -czf .gpu/fer2013.tgz.tmp --sort=name --owner=0 --group=0 --numeric-owner -C "$FER2013_DIR" \
    --transform 's,^,fer2013/,' "${members[@]}"
  mv .gpu/fer2013.tgz.tmp .gpu/fer2013.tgz
fi
commit=$(git rev-parse HEAD)
dirty=false
[ -n "$(git status --porcelain --untracked-files=no)" ] && dirty=true
printf 'CNNLAB_GIT_COMMIT=%s\nCNNLAB_GIT_DIRTY=%s\n' "$commit" "$dirty" > .gpu/source.env
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
whl=$(du -cb .whl/*.whl | tail -1 | cut -f1)
data=$(du -cb .gpu | tail -1 | cut -f1)
mib() { awk "BEGIN { printf \"%.1f\", $1 / 1048576 }"; }
echo "travels: tree $(mib "$tree") MiB + .whl $(mib "$whl") MiB + .gpu $(mib "$data") MiB = $(mib $((tree + whl + data))) MiB (limit 64)"
[ "$dirty" = true ] && echo "note: uncommitted changes; runs will say git_dirty=true"
echo "device: run(command=\"bash benchmarks/gpu/run.sh benchmarks/gpu/jobs.yaml --deadline 380\", carry=[\".whl\", \".gpu\"], timeout_s=480)"
