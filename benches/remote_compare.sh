#!/usr/bin/env bash
# A hit from the shared tier beside a plain S3 download of the same files, with hyperfine, in
# one run, against a real S3 server (SeaweedFS on loopback, started by scripts/with-s3.sh):
#
#   a. raw GET: the output's files as plain objects, fetched with `curl --aws-sigv4`, 8 at once
#   a'. the same, then `sync -f` (the files on disk, as kliko's are before it names them)
#   b. kliko run on a machine that never ran it (a fresh, empty store): a hit from the tier
#      (reads kliko.yml out of the image, creates the store, fetches and checks every file,
#      places the output)
#   c. kliko run, local hit (the same store again), for reference
#
#   bash scripts/with-s3.sh bash benches/remote_compare.sh
#   FILES=20 MIB=1 SMALL=500 RUNS=5 KLIKO_BIN=target/release/kliko bash scripts/with-s3.sh bash benches/remote_compare.sh
#
# Needs: docker, a static busybox (/bin/busybox or KLIKO_TEST_BUSYBOX), hyperfine, jq, curl.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNS=${RUNS:-5}
FILES=${FILES:-100}  # of MIB MiB each
MIB=${MIB:-10}
SMALL=${SMALL:-0}    # of 4 KiB
OUT=${OUT:-$repo/benches/results}
BUSYBOX=${KLIKO_TEST_BUSYBOX:-/bin/busybox}
mkdir -p "$OUT"
. "$repo/benches/common.sh"
need hyperfine jq docker curl
[[ -n ${KLIKO_TEST_S3:-} ]] || { echo "error: run it through scripts/with-s3.sh" >&2; exit 1; }
kliko_binary

bench_workspace remote-compare
build_copy_image
IN=$work/in
mkdir -p "$IN"
for i in $(seq 1 "$FILES"); do head -c $((MIB << 20)) /dev/urandom > "$IN/big$i.bin"; done
for i in $(seq 1 "$SMALL"); do head -c 4096 /dev/urandom > "$IN/small$i.bin"; done
(cd "$IN" && ls) > "$work/names"
total=$(du -sb "$IN" | cut -f1)

REMOTE=$KLIKO_TEST_S3/bench-$$
endpoint=${AWS_ENDPOINT_URL%/}
bucket=${KLIKO_TEST_S3#s3://}
sig=(--aws-sigv4 "aws:amz:${AWS_REGION}:s3" --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY")
# The baseline's objects: the same files, uploaded plainly.
xargs -P 8 -I{} curl -sSf "${sig[@]}" -T "$IN/{}" "$endpoint/$bucket/raw-$$/{}" < "$work/names"
# The tier's copy: made by one kliko run (a miss) on "machine A".
"$KLIKO" --store "$work/store-a" --remote "$REMOTE" run "$IMAGE" --input "$IN" --output "$work/fill" -q --json >/dev/null

LOG_REMOTE=$work/remote.log LOG_LOCAL=$work/local.log
: > "$LOG_REMOTE"; : > "$LOG_LOCAL"
"$KLIKO" --store "$work/store-l" --remote "$REMOTE" run "$IMAGE" --input "$IN" --output "$work/o-l0" -q --json >/dev/null
echo "== $(numfmt --to=iec "$total") in $((FILES + SMALL)) files: shared-tier hit vs raw S3 GET ($RUNS runs)" >&2
hyperfine --style basic --export-json "$OUT/remote.json" --warmup 1 --runs "$RUNS" \
    --prepare "rm -rf $work/o-raw && mkdir $work/o-raw" \
    -n raw_s3_get "xargs -P 8 -I{} curl -sSf ${sig[*]:0:2} ${sig[*]:2:2} -o $work/o-raw/{} $endpoint/$bucket/raw-$$/{} < $work/names" \
    --prepare "rm -rf $work/o-raws && mkdir $work/o-raws" \
    -n raw_s3_get_synced "xargs -P 8 -I{} curl -sSf ${sig[*]:0:2} ${sig[*]:2:2} -o $work/o-raws/{} $endpoint/$bucket/raw-$$/{} < $work/names && sync -f $work/o-raws" \
    --prepare "rm -rf $work/o-remote $work/store-b" \
    -n kliko_remote_hit "$KLIKO --store $work/store-b --remote $REMOTE run $IMAGE --input $IN --output $work/o-remote -q --json >> $LOG_REMOTE" \
    --prepare "rm -rf $work/o-local" \
    -n kliko_local_hit "$KLIKO --store $work/store-l --remote $REMOTE run $IMAGE --input $IN --output $work/o-local -q --json >> $LOG_LOCAL" \
    >&2

# Every timed run was what it claims to be, and every output is the input.
[[ $(grep -c '"hit_from":"remote"' "$LOG_REMOTE") -ge $RUNS ]] || { echo "error: not every run was a hit from the tier" >&2; exit 1; }
[[ $(grep -c '"hit_from":"local"' "$LOG_LOCAL") -ge $RUNS ]] || { echo "error: not every run was a local hit" >&2; exit 1; }
diff -r "$IN" "$work/o-remote" >/dev/null && diff -r "$IN" "$work/o-raw" >/dev/null \
    || { echo "error: an output differs from the input" >&2; exit 1; }

mean() { jq -r --arg n "$1" '.results[] | select(.command == $n) | .mean' "$OUT/remote.json"; }
sd() { jq -r --arg n "$1" '.results[] | select(.command == $n) | .stddev' "$OUT/remote.json"; }
row() {
    awk -v w="$1" -v k="$(mean "$2")" -v s="$(sd "$2")" -v b="$(mean raw_s3_get)" -v mib="$((total >> 20))" 'BEGIN {
        printf "| %s | %.0f ms ± %.0f | %.0f MiB/s | %.2f× |\n", w, k * 1000, s * 1000, mib / k, k / b }'
}
{
    echo "| command ($(numfmt --to=iec "$total"), $((FILES + SMALL)) files) | mean | throughput | ÷ raw GET |"
    echo "| --- | --- | --- | --- |"
    row "raw S3 GET, curl, 8 at once (baseline)" raw_s3_get
    row "raw S3 GET, curl, 8 at once, then sync -f" raw_s3_get_synced
    row "kliko run, hit from the shared tier (fresh store)" kliko_remote_hit
    row "kliko run, local hit" kliko_local_hit
} | tee "$OUT/remote-summary.md"
