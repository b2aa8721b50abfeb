#!/usr/bin/env bash
# Run a command as an unprivileged user with rootless Podman: the user `kliko-rootless`
# (made here if missing, with subordinate ids, and in the `docker` group so that tests can
# build images with Docker and compare), and the containers.conf this kind of machine needs
# (runc, cgroupfs, file events, ulimits a VM without CAP_SYS_RESOURCE allows).
#
#   bash scripts/with-podman.sh path/to/test-binary --test-threads=1
#
# The test binary, and the `kliko` beside it in the target folder, are copied where the user
# can read them (a clone under /root is not); the tests find that kliko in KLIKO_TEST_BIN.
#
# The command runs with HOME, PATH, TMPDIR and CONTAINERS_CONF set and KLIKO_TEST_PODMAN=1,
# and no XDG_RUNTIME_DIR (so kliko starts its own `podman system service`). Afterwards every
# container and image of that user is removed and any Podman process of it stopped.
set -euo pipefail
[ "$(id -u)" -eq 0 ] || { echo "error: scripts/with-podman.sh makes a user and switches to it: run it as root" >&2; exit 1; }
command -v podman >/dev/null || { echo "error: \`podman\` is not installed: run \`bash scripts/setup.sh\`" >&2; exit 1; }
user=${KLIKO_PODMAN_USER:-kliko-rootless}
if ! id "$user" >/dev/null 2>&1; then
  useradd --create-home --shell /bin/sh "$user"
fi
grep -q "^$user:" /etc/subuid || usermod --add-subuids 200000-265535 --add-subgids 200000-265535 "$user"
getent group docker >/dev/null && usermod -aG docker "$user"
home=$(getent passwd "$user" | cut -d: -f6)
uid=$(id -u "$user")
dir=$(mktemp -d /tmp/kliko-podman-test-XXXXXX)
chmod 755 "$dir"
mkdir -m 1777 "$dir/tmp"
cat > "$dir/containers.conf" <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
chmod 644 "$dir/containers.conf"
as_user() {
  runuser -u "$user" -- env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$home" USER="$user" LANG=C.UTF-8 \
    TMPDIR="$dir/tmp" CONTAINERS_CONF="$dir/containers.conf" "$@"
}
cleanup() {
  local rc=$?
  as_user podman rm --all --force >/dev/null 2>&1 || true
  as_user podman rmi --all --force >/dev/null 2>&1 || true
  # The user is kliko's own: stop everything of it (Podman's pause process included).
  pkill -u "$user" 2>/dev/null || true
  sleep 0.5
  pkill -KILL -u "$user" 2>/dev/null || true
  # Podman's runtime folders when there is no XDG_RUNTIME_DIR.
  rm -rf "$dir" "/tmp/containers-user-$uid" "/tmp/podman-run-$uid"
  exit $rc
}
trap cleanup EXIT
# Copies the user may read and run: the test binary, and the kliko it runs.
test_bin=$1
shift
kliko_bin=$(dirname "$test_bin")/../kliko
[ -x "$kliko_bin" ] || { echo "error: no \`kliko\` beside \`$test_bin\` (build it: cargo build --release)" >&2; exit 1; }
mkdir -p "$dir/bin"
cp "$test_bin" "$dir/bin/tests"
cp "$kliko_bin" "$dir/bin/kliko"
chmod 755 "$dir/bin" "$dir/bin/tests" "$dir/bin/kliko"
cd "$dir"
as_user podman info --format '{{.Host.Security.Rootless}}' 2>/dev/null | grep -qx true || {
  echo "error: rootless Podman does not work for \`$user\`:" >&2
  as_user podman info >&2 || true
  exit 1
}
set +e
as_user env KLIKO_TEST_PODMAN=1 KLIKO_TEST_BIN="$dir/bin/kliko" "$dir/bin/tests" "$@"
