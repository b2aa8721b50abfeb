#!/usr/bin/env bash
# A small output through the shared tier, beside a plain `docker run` of the same image, with
# hyperfine, in one run, against a real S3 server (SeaweedFS on loopback, started by
# scripts/with-s3.sh):
#
#   a. docker run --rm --network none IMAGE (the baseline: what running the step costs)
#   b. kliko run on a machine that never ran it (a fresh store): a hit from the shared tier
#   b'. the same on a machine that has used the image before (its store knows the image, not
#      this result)
#   c. kliko run, local hit (the same store again)
#   d. kliko run, a miss with no tier (a fresh store; --no-cache not used: a true first run)
#   e. kliko run, a miss with the tier (the same, then published: the publish overhead)
#
#   bash scripts/with-s3.sh bash benches/remote_small.sh
#   FILES=10 RUNS=10 KLIKO_BIN=target/release/kliko bash scripts/with-s3.sh bash benches/remote_small.sh
#
# Needs: docker, a static busybox (/bin/busybox or KLIKO_TEST_BUSYBOX), hyperfine, jq.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNS=${RUNS:-10}
FILES=${FILES:-10} # of 4 KiB
OUT=${OUT:-$repo/benches/results}
BUSYBOX=${KLIKO_TEST_BUSYBOX:-/bin/busybox}
mkdir -p "$OUT"
. "$repo/benches/common.sh"
need hyperfine jq docker
[[ -n ${KLIKO_TEST_S3:-} ]] || { echo "error: run it through scripts/with-s3.sh" >&2; exit 1; }
kliko_binary

bench_workspace remote-small
build_copy_image
IN=$work/in
mkdir -p "$IN"
for i in $(seq 1 "$FILES"); do head -c 4096 /dev/urandom > "$IN/f$i.bin"; done
REMOTE=$KLIKO_TEST_S3/bench-small-$$
"$KLIKO" --store "$work/store-a" --remote "$REMOTE" run "$IMAGE" --input "$IN" --output "$work/fill" -q --json >/dev/null
"$KLIKO" --store "$work/store-l" --remote "$REMOTE" run "$IMAGE" --input "$IN" --output "$work/o-l0" -q --json >/dev/null

# A store that knows the image (it ran it on other input), copied fresh for each timed run.
mkdir -p "$work/other" && echo other > "$work/other/x"
"$KLIKO" --store "$work/store-t" run "$IMAGE" --input "$work/other" --output "$work/o-t" -q --json >/dev/null
# Every timed miss really runs: each gets an input of its own (a nonce file, in --prepare).
L=$work/logs; mkdir -p "$L"
echo "== a small output ($FILES files of 4 KiB) through the shared tier, beside docker run ($RUNS runs)" >&2
hyperfine --style basic --export-json "$OUT/remote-small.json" --warmup 1 --runs "$RUNS" \
    --prepare "rm -rf $work/o-d" \
    -n docker_run "docker run --rm --network none -v $IN:/input:ro -v $work/o-d:/output $IMAGE /kliko" \
    --prepare "rm -rf $work/o-remote $work/store-b" \
    -n kliko_remote_hit "$KLIKO --store $work/store-b --remote $REMOTE run $IMAGE --input $IN --output $work/o-remote -q --json >> $L/remote" \
    --prepare "rm -rf $work/o-warm $work/store-w && cp -a $work/store-t $work/store-w" \
    -n kliko_remote_hit_warm "$KLIKO --store $work/store-w --remote $REMOTE run $IMAGE --input $IN --output $work/o-warm -q --json >> $L/warm" \
    --prepare "rm -rf $work/o-local" \
    -n kliko_local_hit "$KLIKO --store $work/store-l --remote $REMOTE run $IMAGE --input $IN --output $work/o-local -q --json >> $L/local" \
    --prepare "rm -rf $work/o-m $work/store-m $work/in-m && cp -r $IN $work/in-m && date +%s%N > $work/in-m/nonce" \
    -n kliko_miss_no_tier "$KLIKO --store $work/store-m run $IMAGE --input $work/in-m --output $work/o-m -q --json >> $L/miss" \
    --prepare "rm -rf $work/o-m $work/store-m $work/in-m && cp -r $IN $work/in-m && date +%s%N > $work/in-m/nonce" \
    -n kliko_miss_publish "$KLIKO --store $work/store-m --remote $REMOTE run $IMAGE --input $work/in-m --output $work/o-m -q --json >> $L/publish" \
    >&2

check() { [[ $(grep -c "$2" "$L/$1") -ge $RUNS ]] || { echo "error: not every $1 run matched $2" >&2; exit 1; }; }
check remote '"hit_from":"remote"'
check warm '"hit_from":"remote"'
check local '"hit_from":"local"'
check miss '"cache":"miss"'
check publish '"uploaded":[1-9]'
diff -r "$IN" "$work/o-remote" >/dev/null || { echo "error: the remote hit's output differs" >&2; exit 1; }

mean() { jq -r --arg n "$1" '.results[] | select(.command == $n) | .mean' "$OUT/remote-small.json"; }
sd() { jq -r --arg n "$1" '.results[] | select(.command == $n) | .stddev' "$OUT/remote-small.json"; }
row() {
    awk -v w="$1" -v k="$(mean "$2")" -v s="$(sd "$2")" -v b="$(mean docker_run)" -v m="$(mean kliko_miss_no_tier)" 'BEGIN {
        printf "| %s | %.1f ms ± %.1f | %.3f× | %.2f× |\n", w, k * 1000, s * 1000, k / b, k / m }'
}
{
    echo "| command ($FILES files of 4 KiB) | mean | ÷ docker run | ÷ miss without tier |"
    echo "| --- | --- | --- | --- |"
    row "docker run --rm --network none (baseline)" docker_run
    row "kliko run, hit from the shared tier (fresh store)" kliko_remote_hit
    row "kliko run, hit from the shared tier (a store that knows the image)" kliko_remote_hit_warm
    row "kliko run, local hit" kliko_local_hit
    row "kliko run, miss, no tier (fresh store)" kliko_miss_no_tier
    row "kliko run, miss, published to the tier (fresh store)" kliko_miss_publish
} | tee "$OUT/remote-small-summary.md"
