#!/usr/bin/env bash
# Side-by-side timings of the `kliko` binary against the tools it should keep up with
# (b3sum, find, cp), with hyperfine, in one run. Prints a markdown table of ratios against the
# targets; the raw hyperfine JSON stays in $OUT (default: benches/results/).
#
#   bash benches/compare.sh            # RUNS=5 BIG_RUNS=3 by default
#   KLIKO_BENCH_DIR=/data/tmp bash benches/compare.sh
#   KLIKO_BIN=path/to/kliko bash benches/compare.sh   # skip the build
#
# Data (1 GiB file, 100,000 small files, 2 GiB in 200 files) is created in a temporary folder
# on the same filesystem as the repository (not tmpfs) and removed at the end. The page cache is
# not dropped (that needs root and a quiet machine): all numbers are warm-page-cache numbers.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNS=${RUNS:-5}
BIG_RUNS=${BIG_RUNS:-3}
OUT=${OUT:-$repo/benches/results}
mkdir -p "$OUT"

. "$repo/benches/common.sh"
need hyperfine b3sum jq find cp python3
kliko_binary

base=${KLIKO_BENCH_DIR:-${TMPDIR:-/tmp}}
if [[ $(stat -c %d "$base") != $(stat -c %d "$repo") ]]; then
    base=$repo/target   # same filesystem as the repository, ignored by git
fi
work=$(mktemp -d -p "$base" kliko-compare.XXXXXX)
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
echo "== data in $work ($(stat -f -c %T "$work"))" >&2

python3 - "$work" <<'PY'
import os, sys
w = sys.argv[1]
# 1 GiB file
with open(f"{w}/big", "wb") as f:
    for _ in range(64):
        f.write(os.urandom(16 << 20))
# 100,000 files of 1-4 KiB in 1,000 folders
pool = os.urandom(8 << 20)
for d in range(1000):
    os.makedirs(f"{w}/tree/d{d:04}")
    for i in range(100):
        n = d * 100 + i
        size = 1024 + (n * 7919) % 3073
        off = (n * 104729) % (len(pool) - size)
        with open(f"{w}/tree/d{d:04}/f{n:06}", "wb") as f:
            f.write(n.to_bytes(8, "little") + pool[off:off + size - 8])
# 2 GiB in 200 files of 10 MiB
os.makedirs(f"{w}/data")
for i in range(200):
    with open(f"{w}/data/f{i:03}", "wb") as f:
        f.write(os.urandom(10 << 20))
PY
sync -f "$work"
# The stat cache trusts a file only once it is older than the racy window (2 s).
sleep 3

S=$work/store
D=$("$KLIKO" hash --no-stat-cache "$work/data" | cut -d' ' -f1)
# The warm stat cache: fill it once, and check it then reads nothing.
"$KLIKO" --store "$S" hash "$work/tree" >/dev/null
warm_read=$("$KLIKO" --store "$S" hash --json "$work/tree" | jq .bytes_read)
[[ $warm_read == 0 ]] || { echo "error: the warm re-hash read $warm_read bytes" >&2; exit 1; }
# A filled store for materialize alone.
"$KLIKO" --store "$work/filled" store ingest "$work/data" >/dev/null

hf() { hyperfine --style basic --export-json "$OUT/$1.json" "${@:2}" >&2; }

echo "== 1. 1 GiB file" >&2
hf big --warmup 1 --runs "$RUNS" \
    -n kliko "$KLIKO hash --no-stat-cache $work/big" \
    -n b3sum "b3sum $work/big"

echo "== 2a. 100,000 small files, cold" >&2
hf tree_cold --warmup 1 --runs "$RUNS" \
    -n kliko "$KLIKO hash --no-stat-cache $work/tree" \
    -n find_xargs_b3sum "find $work/tree -type f -print0 | xargs -0 b3sum > /dev/null" \
    -n find_xargs_P_b3sum "find $work/tree -type f -print0 | xargs -0 -P $(nproc) -n 2000 b3sum > /dev/null"

echo "== 2b. 100,000 small files, warm stat cache" >&2
hf tree_warm --warmup 1 --runs "$RUNS" \
    -n kliko "$KLIKO --store $S hash $work/tree" \
    -n find_stat "find $work/tree -printf '%s %T@\n' > /dev/null"

echo "== 3. 2 GiB in 200 files: ingest + materialize --mode link" >&2
hf ingest_materialize --warmup 1 --runs "$BIG_RUNS" \
    --prepare "rm -rf $work/s $work/m $work/c" \
    -n kliko "$KLIKO --store $work/s store ingest $work/data && $KLIKO --store $work/s store materialize $D $work/m --mode link" \
    -n cp_al "cp -al $work/data $work/c"

hf materialize_link --warmup 1 --runs "$RUNS" \
    --prepare "rm -rf $work/m $work/c" \
    -n kliko "$KLIKO --store $work/filled store materialize $D $work/m --mode link" \
    -n cp_al "cp -al $work/data $work/c"

hf ingest --warmup 1 --runs "$BIG_RUNS" \
    --prepare "rm -rf $work/s $work/c" \
    -n kliko "$KLIKO --store $work/s store ingest $work/data" \
    -n b3sum_cp "b3sum $work/data/* > /dev/null && cp -r $work/data $work/c" \
    -n b3sum_cp_sync "b3sum $work/data/* > /dev/null && cp -r $work/data $work/c && sync -f $work/c"

mean() { jq -r --arg n "$2" '.results[] | select(.command == $n) | .mean' "$OUT/$1.json"; }
row() { # what file kliko-name baseline-name target-text target-max
    local k b
    k=$(mean "$2" "$3"); b=$(mean "$2" "$4")
    awk -v w="$1" -v k="$k" -v b="$b" -v bn="$4" -v t="$5" -v max="$6" 'BEGIN {
        r = k / b; ok = (max == "" ? "—" : (r <= max ? "yes" : "**no**"));
        printf "| %s | %.3f s | %s %.3f s | %.2f× | %s | %s |\n", w, k, bn, b, r, t, ok }'
}

{
    echo "| measurement | kliko | baseline | kliko / baseline | target | met |"
    echo "| --- | --- | --- | --- | --- | --- |"
    row "hash 1 GiB file" big kliko b3sum "≤ 1.11× (throughput ≥ 0.9× b3sum)" 1.111
    row "hash 100k small files, cold" tree_cold kliko find_xargs_b3sum "≤ 1.5×" 1.5
    row "hash 100k small files, cold" tree_cold kliko find_xargs_P_b3sum "(info: b3sum on $(nproc) processes)" ""
    row "re-hash 100k files, warm stat cache" tree_warm kliko find_stat "≤ 2×" 2
    row "ingest + materialize link, 2 GiB / 200 files" ingest_materialize kliko cp_al "≤ 2×" 2
    row "materialize link alone" materialize_link kliko cp_al "(info)" ""
    row "ingest alone" ingest kliko b3sum_cp "(info)" ""
    row "ingest alone" ingest kliko b3sum_cp_sync "(info)" ""
} | tee "$OUT/summary.md"
