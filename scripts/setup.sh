#!/usr/bin/env bash
# Install what building and testing kliko needs on Debian/Ubuntu (idempotent).
# Rust comes from rustup; Docker must already be installed and running.
set -euo pipefail
packages=(libclang-dev clang busybox-static b3sum hyperfine chromium gcc libc6-dev python3-venv iproute2 slurm-wlm podman runc uidmap slirp4netns fuse-overlayfs graphviz)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "error: cargo not found: install Rust from https://rustup.rs" >&2; exit 1; }
if ! docker info >/dev/null 2>&1; then
  echo "error: the Docker daemon is not reachable: start it (\`systemctl start docker\`) or set DOCKER_HOST" >&2
  exit 1
fi
