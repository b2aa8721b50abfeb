#!/usr/bin/env bash
# The long torture run: 1,000 SIGKILLs of `kliko run` at random moments with gc alongside
# (the suite runs the same test with 30). Prints the seed, the counts, and fails on anything
# wrong: a partial or wrong output, a wrong cached result, an fsck problem, a container or
# litter left behind.
#
#   bash scripts/torture.sh            # KILLS=1000, at most SECONDS_MAX=3600
set -euo pipefail
cd "$(dirname "$0")/.."
export KLIKO_TORTURE_KILLS=${KILLS:-1000}
export KLIKO_TORTURE_SECONDS=${SECONDS_MAX:-3600}
# Most runs are killed (a run takes about half a second here); some still finish.
export KLIKO_TORTURE_MAX_DELAY_MS=${MAX_DELAY_MS:-900}
cargo test --release -p kliko-cli --test cli -- torture:: --nocapture
