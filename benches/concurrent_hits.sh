#!/usr/bin/env bash
# N identical `kliko run` hits started at once on one store: how long each waits for the
# store's index (from `KLIKO_TRACE`: the Δ of "index lock taken" after "waiting for the index
# lock"; a process that opened a read-only view waited 0), and how long each takes in all.
# Target (issue "Hardening"): at 20 concurrent processes, no hit waits more than 10 ms.
#
#   bash benches/concurrent_hits.sh                       # N=20, ROUNDS=5
#   BASELINE_BIN=/path/to/older/kliko bash benches/concurrent_hits.sh   # the same, side by side
#
# A baseline binary that prints no lock marks (before they existed) is measured by wall time
# only. Needs docker, a static busybox (/bin/busybox or KLIKO_TEST_BUSYBOX), jq.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
N=${N:-20}
ROUNDS=${ROUNDS:-5}
OUT=${OUT:-$repo/benches/results}
BUSYBOX=${KLIKO_TEST_BUSYBOX:-/bin/busybox}
mkdir -p "$OUT"

. "$repo/benches/common.sh"
need docker jq awk
kliko_binary

bench_workspace concurrent
build_copy_image
IN=$work/in
mkdir -p "$IN"
for i in $(seq 1 20); do head -c 8192 /dev/urandom > "$IN/f$i.bin"; done

# measure NAME BINARY: ROUNDS rounds of N hits at once; one line per process: wait_ms wall_ms
measure() {
    local name=$1 bin=$2 store=$work/store-$1 r i
    "$bin" --store "$store" run "$IMAGE" --input "$IN" --output "$work/fill-$name" -q --json > /dev/null
    : > "$work/$name.txt"
    for r in $(seq "$ROUNDS"); do
        rm -rf "$work/o-$name"; mkdir -p "$work/o-$name"
        for i in $(seq "$N"); do
            (
                t=$(date +%s%N)
                KLIKO_TRACE=1 "$bin" --store "$store" run "$IMAGE" --input "$IN" --output "$work/o-$name/$i" -q --json \
                    > "$work/o-$name/$i.json" 2> "$work/o-$name/$i.trace"
                echo $(( ($(date +%s%N) - t) / 1000 )) > "$work/o-$name/$i.wall"
            ) &
        done
        wait
        for i in $(seq "$N"); do
            grep -q '"cache":"hit"' "$work/o-$name/$i.json" || { echo "error: $name: run $i was not a hit:" >&2; cat "$work/o-$name/$i.json" "$work/o-$name/$i.trace" >&2; exit 1; }
            tr=$work/o-$name/$i.trace
            # Every time this process waited for the lock (it may open the index more than once).
            wait_ms=$(sed -n 's/.*(Δ \([0-9.]*\) ms) index lock taken.*/\1/p' "$tr" | awk '{ s += $1 } END { printf "%.1f", s }')
            grep -qE "index lock taken|opened read-only" "$tr" || wait_ms="-"
            echo "$wait_ms $(awk -v u="$(cat "$work/o-$name/$i.wall")" 'BEGIN { printf "%.1f", u / 1000 }')" >> "$work/$name.txt"
        done
    done
}

# stats FILE COLUMN: median p90 max
stats() {
    awk -v c="$2" '$c != "-" { print $c }' "$1" | sort -n | awk '
        { v[NR] = $1 } END {
            if (NR == 0) { print "— — —"; exit }
            m = v[int((NR + 1) / 2)]; p = v[int(NR * 0.9 + 0.999)]; printf "%.1f %.1f %.1f\n", m, p, v[NR] }'
}

measure current "$KLIKO"
names=(current)
if [[ -n ${BASELINE_BIN:-} ]]; then
    measure baseline "$BASELINE_BIN"
    names+=(baseline)
fi
{
    echo "$N hits started at once, $ROUNDS rounds (ms; wait = time blocked on the index lock):"
    echo
    echo "| binary | wait median | wait p90 | wait max | wall median | wall p90 | wall max | target: wait ≤ 10 ms |"
    echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
    for n in "${names[@]}"; do
        read -r wm wp wx < <(stats "$work/$n.txt" 1)
        read -r lm lp lx < <(stats "$work/$n.txt" 2)
        met=$(awk -v x="$wx" 'BEGIN { print (x == "—" ? "—" : (x + 0 <= 10 ? "yes" : "**no**")) }')
        echo "| $n | $wm | $wp | $wx | $lm | $lp | $lx | $met |"
    done
} | tee "$OUT/concurrent-hits.md"
