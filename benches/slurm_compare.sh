#!/usr/bin/env bash
# kliko's Slurm executor against plain Slurm, side by side in one run, on a private
# single-node cluster (scripts/with-slurm.sh starts it when this script is not already under
# it; it needs root, as slurmd does). Results: benches/SLURM.md.
#
#   bash benches/slurm_compare.sh                 # RUNS=5 by default
#   KLIKO_BIN=path/to/kliko bash benches/slurm_compare.sh   # skip the build
#
# 1. Dispatcher overhead per step: `kliko pipeline run --executor slurm` of a one-step
#    pipeline whose input changes before every run (so every run is a miss: plan, push the
#    input to the tier, sbatch, the job's `kliko run-plan`, container, publish, the record seen
#    by the dispatcher), against `sbatch --wait` of the same container by `docker run`, and
#    `srun docker run` (no polling at all). Both baselines get the same input.
# 2. A cached re-run of a 100-step pipeline (10 chains of 10) with `--executor slurm`: no job
#    is submitted (counted from Slurm by the jobs' comment). Target: under a second.
#
# Needs docker, hyperfine, jq, python3 and Slurm (`bash scripts/setup.sh` installs it).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z ${KLIKO_TEST_SLURM:-} ]]; then
    exec bash "$repo/scripts/with-slurm.sh" bash "${BASH_SOURCE[0]}" "$@"
fi
RUNS=${RUNS:-5}
OUT=${OUT:-$repo/benches/results}
mkdir -p "$OUT"

. "$repo/benches/common.sh"
need hyperfine jq python3 docker sbatch srun scontrol busybox
BUSYBOX=$(command -v busybox)
kliko_binary
bench_workspace slurm
# Each run copies its input and adds a line, so every step of a chain has its own key.
build_copy_image 'cp -r /input/. /output/ && echo step >> /output/trail'
tag=kliko-bench-$$
export KLIKO_STORE=$work/store KLIKO_NODE_STORE=$work/node KLIKO_REMOTE=$work/tier
export KLIKO_SLURM_LOGS=$work/logs KLIKO_SLURM_ARGS="--comment=$tag"
mkdir -p "$work/tier" "$work/in" "$work/out"
jobs_submitted() { scontrol show job -o 2>/dev/null | grep -cE "Comment=$tag( |$)" || true; }

# 1. One step, a miss every time.
printf 'version: 1\nsteps:\n  copy:\n    image: %s\n    input: in/\n' "$IMAGE" > "$work/one.yml"
prepare="date +%s%N > $work/in/stamp; rm -rf $work/out/*"
docker_run="docker run --rm --network none -v $work/in:/input:ro -v $work/out:/output $IMAGE /kliko"
echo "== one step per run: kliko --executor slurm vs sbatch --wait vs srun" >&2
hyperfine --style basic --warmup 1 --runs "$RUNS" --prepare "$prepare" --export-json "$OUT/slurm-step.json" \
    -n "kliko pipeline run --executor slurm (1 step, miss)" "$KLIKO pipeline run $work/one.yml --executor slurm" \
    -n "sbatch --wait docker run" "sbatch --quiet --wait --comment=$tag-plain --output=/dev/null --wrap '$docker_run'" \
    -n "srun docker run" "srun --quiet --comment=$tag-plain $docker_run" >&2
mean() { jq ".results[$1].mean" "$OUT/slurm-step.json"; }
k=$(mean 0) sb=$(mean 1) sr=$(mean 2)
step_jobs=$(jobs_submitted)

# 2. 100 steps, 10 chains of 10, every step copies what it reads and adds a line.
python3 - "$work/hundred.yml" "$IMAGE" <<'PY'
import sys
path, image = sys.argv[1], sys.argv[2]
lines = ["version: 1", "steps:"]
for c in range(10):
    for i in range(10):
        src = f"in{c}/" if i == 0 else f"c{c}s{i - 1}"
        lines += [f"  c{c}s{i}:", f"    image: {image}", f"    input: {src}"]
open(path, "w").write("\n".join(lines) + "\n")
PY
for c in $(seq 0 9); do mkdir -p "$work/in$c" && echo "chain $c" > "$work/in$c/data"; done
echo "== filling: the 100-step pipeline through Slurm once" >&2
before=$(jobs_submitted)
t0=$(date +%s.%N)
"$KLIKO" pipeline run "$work/hundred.yml" --executor slurm --json > "$work/fill.json" 2>"$work/fill.err" || {
    tail -n 30 "$work/fill.err" >&2; exit 1; }
fill_s=$(python3 -c "print(f'{$(date +%s.%N) - $t0:.1f}')")
fill_jobs=$(( $(jobs_submitted) - before ))
[[ $fill_jobs == 100 ]] || { echo "error: filling the 100 steps submitted $fill_jobs jobs" >&2; exit 1; }
echo "== cached re-run: --executor slurm vs --executor local" >&2
before=$(jobs_submitted)
hyperfine --style basic --warmup 1 --runs $((RUNS * 2)) --export-json "$OUT/slurm-cached.json" \
    -n "kliko pipeline run --executor slurm (100 steps, cached)" "$KLIKO pipeline run $work/hundred.yml --executor slurm" \
    -n "kliko pipeline run --executor local (100 steps, cached)" "$KLIKO pipeline run $work/hundred.yml" \
    -n "sinfo" "sinfo --noheader --format=%R" >&2
cached_jobs=$(( $(jobs_submitted) - before ))
containers=$("$KLIKO" pipeline run "$work/hundred.yml" --executor slurm --json 2>/dev/null | jq .containers)
c_slurm=$(jq '.results[0].mean' "$OUT/slurm-cached.json")
c_local=$(jq '.results[1].mean' "$OUT/slurm-cached.json")
c_sinfo=$(jq '.results[2].mean' "$OUT/slurm-cached.json")

f() { python3 -c "print(f'{$1:.3f}')"; }
r() { python3 -c "print(f'{$1 / $2:.2f}')"; }
{
    echo "| what | kliko | baseline | ratio | target | met |"
    echo "| --- | --- | --- | --- | --- | --- |"
    echo "| one step, miss, submit → result seen | $(f "$k") s | \`sbatch --wait\` $(f "$sb") s | $(r "$k" "$sb")× | (overhead, info) | — |"
    echo "| one step, miss | $(f "$k") s | \`srun docker run\` $(f "$sr") s | $(r "$k" "$sr")× | (info) | — |"
    echo "| 100 steps cached, \`--executor slurm\` ($cached_jobs jobs, $containers containers) | $(f "$c_slurm") s | \`--executor local\` $(f "$c_local") s | $(r "$c_slurm" "$c_local")× | < 1 s, 0 jobs | $(python3 -c "print('yes' if $c_slurm < 1 and $cached_jobs == 0 and $containers == 0 else 'no')") |"
    echo "| \`sinfo\` (the preflight's one Slurm call) | — | $(f "$c_sinfo") s | — | (info) | — |"
    echo "| filling the 100 steps through Slurm | $fill_s s, $fill_jobs jobs | — | — | (info) | — |"
    echo
    echo "Jobs the one-step benchmark submitted through kliko (warm-up included): $step_jobs."
} | tee "$OUT/slurm-summary.md"
[[ $cached_jobs == 0 && $containers == 0 ]]
