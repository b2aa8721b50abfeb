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
