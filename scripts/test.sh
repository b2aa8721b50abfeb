#!/usr/bin/env bash
# The test command: install what is missing, then run every test (release profile everywhere,
# so RocksDB's C++ is compiled once for tests, benches and the binary).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The RO-Crate validator and reader (PyPI, in a venv): the crates kliko writes are checked by them.
export KLIKO_ROC_VENV=${KLIKO_ROC_VENV:-/var/tmp/kliko-roc-venv}
if ! "$KLIKO_ROC_VENV/bin/python" -c 'import rocrate, rocrate_validator' 2>/dev/null; then
  python3 -m venv "$KLIKO_ROC_VENV"
  "$KLIKO_ROC_VENV/bin/pip" install --quiet roc-validator==0.13.0 rocrate==0.16.0
fi
cargo test --release --workspace "$@"
# The shared tier against a real S3 server (SeaweedFS on loopback, in its own network namespace).
bash scripts/with-s3.sh cargo test --release --offline -p kliko-engine -p kliko-cli --test fake_runtime --test cli -- tier bucket s3
# Pipelines through a real Slurm (a private single-node cluster on loopback, a shared-folder tier).
bash scripts/with-slurm.sh cargo test --release --offline -p kliko-cli --test cli -- slurm_cli::
# Rootless Podman, as an unprivileged user (made by scripts/with-podman.sh): the test binary
# is built here and run as that user, one test at a time (each starts its own Podman service).
podman_tests=$(cargo test --release --offline -p kliko-cli --test cli --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("executable") and m.get("target", {}).get("name") == "cli":
        print(m["executable"])')
bash scripts/with-podman.sh "$podman_tests" podman_cli:: --test-threads=1
