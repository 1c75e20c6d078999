#!/usr/bin/env bash
# Runs benches/bench_hot_path.py (this tree's copy) on commit BASE and on this working tree,
# alternately (BASE, HERE, BASE, HERE, ...: drift on a shared machine hits both alike), both
# on release builds, and prints every figure side by side (the median over the repeats).
#
#   scripts/compare_commits.sh BASE [REPEATS=2]
#   HOT_PATH_K="miss and 5000" scripts/compare_commits.sh BASE   # only the selected figures
#
# BASE is checked out into a temporary git worktree with its own venv; its Rust build goes to
# target/compare-base (kept between runs: only the crate itself recompiles). The harness, and
# the bench helpers it imports, are copied from this tree, so both sides run the same code.
set -euo pipefail

BASE=${1:?usage: scripts/compare_commits.sh BASE [REPEATS]}
REPEATS=${2:-2}
HERE=$(cd "$(dirname "$0")/.." && pwd)
TMP=$(mktemp -d)
SRC="$TMP/src"
VENV="$TMP/venv"
trap 'git -C "$HERE" worktree remove --force "$SRC" >/dev/null 2>&1 || true; rm -rf "$TMP"' EXIT

echo "== building $BASE in $SRC (release)" >&2
git -C "$HERE" worktree add --detach "$SRC" "$BASE" >/dev/null
cp "$HERE/benches/bench_hot_path.py" "$HERE/benches/streams.py" "$HERE/benches/conftest.py" \
    "$SRC/benches/"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip "maturin>=1.5,<2"
(cd "$SRC" && CARGO_TARGET_DIR="$HERE/target/compare-base" VIRTUAL_ENV="$VENV" \
    "$VENV/bin/maturin" develop --release --extras dev -q)
"$VENV/bin/python" -m pip install -q "cashews>=7"

echo "== building this tree (release)" >&2
(cd "$HERE" && .venv/bin/maturin develop --skip-install --release -q)

run() {  # run SIDE PYTHON DIR OUT
    echo "== run: $1" >&2
    (cd "$3" && HOT_PATH_JSON="$4" "$2" -m pytest benches/bench_hot_path.py -q -s \
        -k "${HOT_PATH_K:-}" >"$4.log" 2>&1) \
        || { tail -30 "$4.log" >&2; exit 1; }
}
for i in $(seq 1 "$REPEATS"); do
    run "$BASE #$i" "$VENV/bin/python" "$SRC" "$TMP/base.$i.json"
    run "HEAD #$i" "$HERE/.venv/bin/python" "$HERE" "$TMP/head.$i.json"
done

"$HERE/.venv/bin/python" - "$BASE" "$TMP" "$REPEATS" <<'EOF'
import json, statistics, sys
base, tmp, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
def load(side):
    runs = [json.load(open(f"{tmp}/{side}.{i}.json")) for i in range(1, repeats + 1)]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}
b, h = load("base"), load("head")
names = sorted({k.rsplit(" | ", 1)[0] for k in h})
w = max(len(n) for n in names)
print(f"{'figure (median of %d runs each, alternated)' % repeats:<{w}} | {'ref':>9} | "
      f"{base[:9]:>9} | {'HEAD':>9} | HEAD/base")
for n in names:
    ref = h.get(f"{n} | ref", float("nan"))
    bo, ho = b.get(f"{n} | ours", float("nan")), h[f"{n} | ours"]
    ratio = f"{ho / bo:.2f}x" if bo else "-"
    print(f"{n:<{w}} | {ref:9.3f} | {bo:9.3f} | {ho:9.3f} | {ratio}")
EOF
