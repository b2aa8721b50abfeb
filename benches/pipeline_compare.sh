#!/usr/bin/env bash
# Re-running the unchanged example pipeline (examples/pipeline: a per-observation flagger
# `foreach`, then `combine`) over a 100,000-file input, side by side in one hyperfine run with
# one plain stat walk of that input. Target: kliko ≤ 3× the stat walk. Results: benches/PIPELINE.md.
#
#   bash benches/pipeline_compare.sh                  # RUNS=10 by default
#   KLIKO_BIN=path/to/kliko bash benches/pipeline_compare.sh   # skip the build
#
# Needs docker (the two example images are built here, FROM scratch with a static busybox),
# hyperfine, jq and python3. The data lives in a temporary folder on the repository's
# filesystem and is removed at the end; warm page cache, as in compare.sh.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNS=${RUNS:-10}
OUT=${OUT:-$repo/benches/results}
mkdir -p "$OUT"

. "$repo/benches/common.sh"
need hyperfine jq find python3 docker
kliko_binary
echo "== building the example images" >&2
bash "$repo/examples/build-image.sh" "$repo/examples/flagger" kliko-example-flagger:latest >&2
bash "$repo/examples/build-image.sh" "$repo/examples/combine" kliko-example-combine:latest >&2

base=${KLIKO_BENCH_DIR:-${TMPDIR:-/tmp}}
if [[ $(stat -c %d "$base") != $(stat -c %d "$repo") ]]; then
    base=$repo/target
fi
work=$(mktemp -d -p "$base" kliko-pipeline-compare.XXXXXX)
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
export KLIKO_STORE=$work/store
cp "$repo/examples/pipeline/pipeline.yml" "$work/pipeline.yml"

# 10 observations × 10,000 files: each a scan.csv (what the flagger reads) and 9,999 raw files
# of 1-4 KiB in 99 folders.
python3 - "$work/observations" "$repo/examples/flagger/data/obs1.csv" <<'PY'
import os, sys
root, csv = sys.argv[1], open(sys.argv[2], "rb").read()
pool = os.urandom(4 << 20)
n = 0
for o in range(10):
    obs = f"{root}/obs-{o:02}"
    os.makedirs(obs)
    with open(f"{obs}/scan.csv", "wb") as f:
        f.write(csv)
    n += 1
    for d in range(99):
        os.makedirs(f"{obs}/raw/d{d:02}")
        for i in range(101):
            size = 1024 + (n * 7919) % 3073
            off = (n * 104729) % (len(pool) - size)
            with open(f"{obs}/raw/d{d:02}/f{i:03}", "wb") as f:
                f.write(n.to_bytes(8, "little") + pool[off:off + size - 8])
            n += 1
assert n == 100_000, n
PY
files=$(find "$work/observations" -type f | wc -l)
echo "== $files files in $work/observations" >&2
sync -f "$work"
# The stat cache trusts a file only once it is older than the racy window (2 s).
sleep 3

echo "== first run (fills the store; not measured)" >&2
"$KLIKO" pipeline run "$work/pipeline.yml" --jobs 2 >&2
containers=$("$KLIKO" pipeline run "$work/pipeline.yml" --json 2>/dev/null | jq .containers)
[[ $containers == 0 ]] || { echo "error: the unchanged re-run started $containers containers" >&2; exit 1; }

echo "== re-run vs stat walk" >&2
hyperfine --style basic --warmup 2 --runs "$RUNS" --export-json "$OUT/pipeline.json" \
    -n "kliko pipeline run (unchanged, 100k files)" "$KLIKO pipeline run $work/pipeline.yml 2>/dev/null" \
    -n "find -printf '%s %T@\\n'" "find $work/observations -printf '%s %T@\\n' > /dev/null" >&2

kliko_s=$(jq '.results[0].mean' "$OUT/pipeline.json")
find_s=$(jq '.results[1].mean' "$OUT/pipeline.json")
ratio=$(python3 -c "print(f'{$kliko_s / $find_s:.2f}')")
met=$(python3 -c "print('yes' if $kliko_s <= 3 * $find_s else 'no')")
printf '| input | kliko re-run | `find -printf` | kliko / find | target | met |\n| --- | --- | --- | --- | --- | --- |\n'
printf '| %s files, 10 foreach entries + combine | %.3f s | %.3f s | %s× | ≤ 3× | %s |\n' "$files" "$kliko_s" "$find_s" "$ratio" "$met"
[[ $met == yes ]]
