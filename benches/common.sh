# Shared by the comparison scripts in benches/ (sourced, not run). Needs `$repo` set.

# need TOOL...: fail with a clear message unless every tool is on PATH.
need() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null || { echo "error: \`$tool\` is needed" >&2; exit 1; }
    done
}

# The kliko binary to time: $KLIKO_BIN if given (skips the build), else a fresh release build.
kliko_binary() {
    if [[ -n ${KLIKO_BIN:-} ]]; then
        KLIKO=$KLIKO_BIN
    else
        echo "== building kliko (release)" >&2
        (cd "$repo" && cargo build --release -p kliko-cli >&2)
        KLIKO=$repo/target/release/kliko
    fi
}

# bench_workspace NAME: a fresh folder $work and an image tag $IMAGE, both removed on exit.
bench_workspace() {
    work=$(mktemp -d -p "${KLIKO_BENCH_DIR:-${TMPDIR:-/tmp}}" "kliko-$1.XXXXXX")
    IMAGE=kliko-bench-$1-$$:latest
    trap 'docker image rm --force "$IMAGE" >/dev/null 2>&1 || true; chmod -R u+w "$work" 2>/dev/null || true; rm -rf "$work"' EXIT
}

# build_copy_image [SCRIPT]: $IMAGE, FROM scratch with a static busybox ($BUSYBOX), whose /kliko
# copies its input to its output (no parameters), or runs SCRIPT (sh, with busybox's sh and cp).
build_copy_image() {
    local ctx=$work/image
    mkdir -p "$ctx/rootfs/bin"
    cp "$BUSYBOX" "$ctx/rootfs/bin/busybox"
    for applet in sh cp; do ln -s busybox "$ctx/rootfs/bin/$applet"; done
    printf 'schema_version: 4\nio: split\nsections: []\n' > "$ctx/rootfs/kliko.yml"
    printf '#!/bin/sh\n%s\n' "${1:-cp -r /input/. /output/}" > "$ctx/rootfs/kliko"
    chmod 755 "$ctx/rootfs/kliko"
    printf 'FROM scratch\nCOPY rootfs/ /\n' > "$ctx/Dockerfile"
    docker build --quiet --tag "$IMAGE" "$ctx" >/dev/null 2>&1 || { echo "error: docker build failed" >&2; exit 1; }
}
