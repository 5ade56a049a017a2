# Sourced by the build-*-ops.sh scripts after they set `name` (their prefix in messages): a quiet runner and the
# build tools (cmake, a C++ compiler), installed with apt as root when missing.

log=$(mktemp)
trap 'rm -f "$log"' EXIT

run_quiet() {  # run a command; on failure show its output and stop
    if ! "$@" >"$log" 2>&1; then
        cat "$log" >&2
        echo "$name: failed: $*" >&2
        exit 1
    fi
}

if ! command -v cmake >/dev/null || ! command -v c++ >/dev/null; then
    if [ "$(id -u)" != 0 ]; then
        echo "$name: cmake and a C++ compiler are needed; install them (apt-get install cmake g++)" >&2
        exit 1
    fi
    run_quiet apt-get update
    DEBIAN_FRONTEND=noninteractive run_quiet apt-get install -y --no-install-recommends cmake g++ make
fi
