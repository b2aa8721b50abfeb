#!/usr/bin/env bash
# Build kliko and the example image, then run the example twice: a miss, then a hit.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -q -p kliko-cli
kliko=${CARGO_TARGET_DIR:-target}/release/kliko
bash examples/build-image.sh examples/flagger kliko-example-flagger:latest
demo=$(mktemp -d)
export KLIKO_STORE=$demo/store
echo
echo "== first run: a miss, the container runs =="
( set -x; "$kliko" run kliko-example-flagger --input examples/flagger/data --output "$demo/out1" --threshold 4.5 )
echo
echo "== second run, same image, parameters and input: a hit, no container =="
( set -x; "$kliko" run kliko-example-flagger --input examples/flagger/data --output "$demo/out2" --threshold 4.5 )
echo
echo "== the output, and where it came from =="
cat "$demo/out2/report.txt"
"$kliko" provenance "$demo/out2/report.txt" | head -20
echo
echo "store and outputs are in $demo (delete it when done)"
