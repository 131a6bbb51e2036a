#!/usr/bin/env bash
# Builds the host kernels of a git revision (or of the checkout as it stands: "worktree") as
# the Python module _native_NAME, so that scripts/ab_moe.py can time several builds in one
# process, interleaved. Prints the module's path.
#   scripts/build_variant.sh REV NAME [OUT_DIR]      e.g.  scripts/build_variant.sh HEAD old
# OUT_DIR (default /tmp/ktjax-variants) gets src_NAME/, build_NAME/ and the module.
set -euo pipefail
REV=$1 NAME=$2 OUT=${3:-/tmp/ktjax-variants}
[[ $NAME =~ ^[A-Za-z0-9_]+$ ]] || { echo "build_variant.sh: NAME must be letters, digits or _" >&2; exit 2; }
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
SRC=$OUT/src_$NAME BUILD=$OUT/build_$NAME
rm -rf "$SRC" "$BUILD" && mkdir -p "$SRC"
cd "$ROOT"
if [ "$REV" = worktree ]; then  # tracked and untracked files, as git would commit them
  git ls-files -z --cached --others --exclude-standard |
    tar --null -T - --ignore-failed-read -cf - | tar -xf - -C "$SRC"  # deleted: skipped
else
  # Named on stderr: a copy of the repository whose history lags the checkout (a remote
  # machine's) resolves HEAD to an older commit without complaint.
  echo "build_variant.sh: $NAME is $REV = $(git rev-parse --short "$REV^{commit}")" >&2
  git archive "$REV" | tar -xf - -C "$SRC"
fi
sed -i "s/PYBIND11_MODULE(_native, m)/PYBIND11_MODULE(_native_$NAME, m)/" "$SRC/cpu_kernels/module.cpp"
GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)
cmake -S "$SRC" -B "$BUILD" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$(command -v "$PY")" -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" >"$OUT/$NAME.log" 2>&1
cmake --build "$BUILD" -j"$(nproc)" --target _native >>"$OUT/$NAME.log" 2>&1 || { tail -30 "$OUT/$NAME.log" >&2; exit 1; }
SO=$(ls "$BUILD"/_native*.so)
DEST=$OUT/$(basename "$SO" | sed "s/^_native/_native_$NAME/")
cp "$SO" "$DEST"
echo "$DEST"
