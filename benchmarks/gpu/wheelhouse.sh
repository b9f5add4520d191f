#!/usr/bin/env bash
# The wheels the GPU machine lacks (requirements.txt), for its CPython and platform: `make wheelhouse` -> .whl/.
#   benchmarks/gpu/wheelhouse.sh [DEST] [PYTHON_VERSION]      (default .whl 3.12; check.sh builds 3.11)
# Compiled packages come as manylinux x86_64 builds for that version; a line marked `# build` (a pure-Python package
# published as source only) is built into a py3-none-any wheel here. One version of each, or the install stops.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dest=${1:-.whl}
pyver=${2:-3.12}
pip=(python3 -m pip)
[ -x .venv/bin/python ] && pip=(.venv/bin/python -m pip)
mkdir -p "$dest"
rm -f "$dest"/*.whl
reqs=$(mktemp) && trap 'rm -f "$reqs"' EXIT
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
grep -v '# build$' "$here/requirements.txt" > "$reqs"
"${pip[@]}" download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --implementation cp \
  --python-version "$pyver" "${platforms[@]}" -d "$dest" -r "$reqs"
grep '# build$' "$here/requirements.txt" | sed 's/#.*//' > "$reqs"
if [ -s "$reqs" ]; then
  "${pip[@]}" wheel --quiet --disable-pip-version-check --no-deps -w "$dest" -r "$reqs"
fi
wanted=$(grep -cv '^\s*\(#\|$\)' "$here/requirements.txt")
got=$(ls "$dest"/*.whl | wc -l)
dupes=$(ls "$dest"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z' 'a-z' | sort | uniq -d)
impure=$(grep '# build$' "$here/requirements.txt" | cut -d= -f1 | tr '-' '_' | while read -r name; do
  ls "$dest"/*.whl | grep -i "/${name}-" | grep -v 'py3-none-any' || true; done)
if [ "$got" != "$wanted" ] || [ -n "$dupes" ] || [ -n "$impure" ]; then
  echo "wheelhouse.sh: $dest holds $got wheels for $wanted requirements${dupes:+; more than one version of: $dupes}${impure:+; built but not pure Python: $impure}" >&2
  exit 1
fi
du -ch "$dest"/*.whl | tail -1 | sed "s|total|$dest: $got wheels for CPython $pyver|"
