#!/usr/bin/env bash
# `kliko run` beside a plain `docker run` of the same tiny image, with hyperfine, in one run:
#
#   a. docker run --rm --network none -v IN:/input:ro -v OUT:/output IMAGE /kliko
#   b. kliko run, cache hit (store filled beforehand; no container is created)
#   c. kliko run, cache miss in a warm store (a new `--salt` every run: a genuine miss, with the
#      image's kliko.yml already remembered and the store's index already created)
#   d. kliko run, cache miss in a fresh empty store (adds reading kliko.yml out of the image and
#      creating the store)
#
# Prints a markdown table of means and ratios against the targets (hit < 0.2×, miss < 1.15× the
# plain docker run) and checks that every timed kliko run really was a hit or a miss.
#
#   bash benches/run_compare.sh                    # RUNS=20 by default (INTERLEAVED=RUNS)
#   KLIKO_BIN=path/to/kliko bash benches/run_compare.sh   # skip the build
#
# Needs: docker (a local daemon; nothing is pulled), a static busybox (/bin/busybox, or
# KLIKO_TEST_BUSYBOX), hyperfine, jq. The image is removed and the data deleted at the end.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNS=${RUNS:-20}
WARMUP=${WARMUP:-3}
OUT=${OUT:-$repo/benches/results}
BUSYBOX=${KLIKO_TEST_BUSYBOX:-/bin/busybox}
mkdir -p "$OUT"

. "$repo/benches/common.sh"
need hyperfine jq docker
kliko_binary

base=${KLIKO_BENCH_DIR:-${TMPDIR:-/tmp}}
work=$(mktemp -d -p "$base" kliko-run-compare.XXXXXX)
IMAGE=kliko-bench-run-$$:latest
cleanup() {
    docker image rm --force "$IMAGE" >/dev/null 2>&1 || true
    chmod -R u+w "$work" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
echo "== data in $work ($(stat -f -c %T "$work"))" >&2

# The image: FROM scratch, a static busybox, and a /kliko that copies its input to its output
# (a small fixed workload: 20 files, 160 KiB).
ctx=$work/image
mkdir -p "$ctx/rootfs/bin"
cp "$BUSYBOX" "$ctx/rootfs/bin/busybox"
for applet in sh cp cat ls sleep; do ln -s busybox "$ctx/rootfs/bin/$applet"; done
cat > "$ctx/rootfs/kliko.yml" <<'EOF'
schema_version: 4
io: split
sections:
  - name: main
    description: settings
    fields:
      - name: level
        type: int
        initial: 1
EOF
cat > "$ctx/rootfs/kliko" <<'EOF'
#!/bin/sh
cp -r /input/. /output/
sleep 0
EOF
chmod 755 "$ctx/rootfs/kliko"
printf 'FROM scratch\nCOPY rootfs/ /\n' > "$ctx/Dockerfile"
docker build --quiet --tag "$IMAGE" "$ctx" >/dev/null 2>&1 || { echo "error: docker build failed" >&2; exit 1; }

IN=$work/in
mkdir -p "$IN"
for i in $(seq 1 20); do head -c 8192 /dev/urandom > "$IN/f$i.bin"; done

S_WARM=$work/store-warm
S_HIT=$work/store-hit
"$KLIKO" --store "$S_HIT" run "$IMAGE" --input "$IN" --output "$work/fill" -q --json > /dev/null
"$KLIKO" --store "$S_WARM" run "$IMAGE" --input "$IN" --output "$work/fill2" -q --salt fill --json > /dev/null
LOG_HIT=$work/hit.log LOG_MISS=$work/miss.log LOG_COLD=$work/cold.log
: > "$LOG_HIT"; : > "$LOG_MISS"; : > "$LOG_COLD"

echo "== kliko run vs docker run ($RUNS runs, $WARMUP warm-up)" >&2
hyperfine --style basic --export-json "$OUT/run.json" --warmup "$WARMUP" --runs "$RUNS" \
    --prepare "rm -rf $work/o-docker && mkdir $work/o-docker" \
    -n docker_run "docker run --rm --network none -v $IN:/input:ro -v $work/o-docker:/output $IMAGE /kliko" \
    --prepare "rm -rf $work/o-hit" \
    -n kliko_hit "$KLIKO --store $S_HIT run $IMAGE --input $IN --output $work/o-hit -q --json >> $LOG_HIT" \
    --prepare "rm -rf $work/o-miss && date +%s%N > $work/salt" \
    -n kliko_miss "$KLIKO --store $S_WARM run $IMAGE --input $IN --output $work/o-miss -q --salt \$(cat $work/salt) --json >> $LOG_MISS" \
    --prepare "rm -rf $work/o-cold $work/store-cold" \
    -n kliko_miss_fresh_store "$KLIKO --store $work/store-cold run $IMAGE --input $IN --output $work/o-cold -q --json >> $LOG_COLD" \
    >&2

# Every timed run was what it claims to be.
check() { # log wanted
    local total bad
    total=$(wc -l < "$1")
    bad=$(grep -vc "\"cache\":\"$2\"" "$1" || true)
    [[ $total -ge $RUNS && $bad == 0 ]] || { echo "error: $1: $bad of $total runs were not a $2" >&2; exit 1; }
}
check "$LOG_HIT" hit
check "$LOG_MISS" miss
check "$LOG_COLD" miss
diff -r "$work/o-docker" "$work/o-miss" >/dev/null && diff -r "$work/o-docker" "$work/o-hit" >/dev/null \
    || echo "warning: the outputs of docker run and kliko run differ" >&2

mean() { jq -r --arg n "$1" '.results[] | select(.command == $n) | .mean' "$OUT/run.json"; }
sd() { jq -r --arg n "$1" '.results[] | select(.command == $n) | .stddev' "$OUT/run.json"; }
row() { # what name target-text target-max
    awk -v w="$1" -v k="$(mean "$2")" -v s="$(sd "$2")" -v b="$(mean docker_run)" -v t="$3" -v max="$4" 'BEGIN {
        r = k / b; ok = (max == "" ? "—" : (r < max ? "yes" : "**no**"));
        printf "| %s | %.1f ms ± %.1f | %.2f× | %s | %s |\n", w, k * 1000, s * 1000, r, t, ok }'
}
{
    echo "| command | mean | ÷ docker run | target | met |"
    echo "| --- | --- | --- | --- | --- |"
    row "docker run --rm (baseline)" docker_run "" ""
    row "kliko run, hit" kliko_hit "< 0.2×" 0.2
    row "kliko run, miss (warm store)" kliko_miss "< 1.15×" 1.15
    row "kliko run, miss (fresh store)" kliko_miss_fresh_store "(info)" ""
} | tee "$OUT/run-summary.md"

# The same comparison with the runs interleaved (docker run, kliko miss, kliko hit, docker run,
# ...): hyperfine times each command in a block of its own, so a machine that drifts during
# the session (a VM's neighbours, the daemon's own clean-up) biases the ratios; interleaving
# gives every command the same conditions. Wall times from `date +%s%N` around each command.
INTERLEAVED=${INTERLEAVED:-$RUNS}
now() { date +%s%N; }
: > "$work/interleaved.txt"
for i in $(seq "$INTERLEAVED"); do
    rm -rf "$work/o-docker" "$work/o-miss" "$work/o-hit"; mkdir "$work/o-docker"
    t=$(now); docker run --rm --network none -v "$IN:/input:ro" -v "$work/o-docker:/output" "$IMAGE" /kliko; d=$(( $(now) - t ))
    t=$(now); "$KLIKO" --store "$S_WARM" run "$IMAGE" --input "$IN" --output "$work/o-miss" -q --salt "i$t" --json >> "$LOG_MISS" 2>> "$work/stderr.log"; m=$(( $(now) - t ))
    t=$(now); "$KLIKO" --store "$S_HIT" run "$IMAGE" --input "$IN" --output "$work/o-hit" -q --json >> "$LOG_HIT" 2>> "$work/stderr.log"; h=$(( $(now) - t ))
    echo "$d $m $h" >> "$work/interleaved.txt"
done
check "$LOG_HIT" hit
check "$LOG_MISS" miss
awk -v n="$INTERLEAVED" '
    { for (c = 1; c <= 3; c++) { s[c] += $c; q[c] += $c * $c } }
    END {
        split("docker run --rm (baseline)|kliko run, hit|kliko run, miss (warm store)", name, "|")
        col[1] = 1; col[2] = 3; col[3] = 2; target[2] = "< 0.2×"; max[2] = 0.2; target[3] = "< 1.15×"; max[3] = 1.15
        print ""; print "Interleaved, " n " rounds:"; print ""
        print "| command | mean | ÷ docker run | target | met |"; print "| --- | --- | --- | --- | --- |"
        for (r = 1; r <= 3; r++) {
            c = col[r]; mu = s[c] / NR; sd = sqrt(q[c] / NR - mu * mu); ratio = mu / (s[1] / NR)
            ok = (max[r] == "" ? "—" : (ratio < max[r] ? "yes" : "**no**"))
            printf "| %s | %.1f ms ± %.1f | %.2f× | %s | %s |\n", name[r], mu / 1e6, sd / 1e6, ratio, target[r], ok
        }
    }' "$work/interleaved.txt" | tee -a "$OUT/run-summary.md"
