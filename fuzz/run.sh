#!/usr/bin/env bash
# fuzz/run.sh [SECONDS]: builds crashmon's fuzz targets and runs each for SECONDS (default 60)
# from its committed corpus (corpus/TARGET: seeds, findings and the long runs' inputs, minimised);
# fails on any crash, timeout or out-of-memory.
#
#   fuzz/run.sh              one minute per target (what `./crashmon test` runs)
#   fuzz/run.sh 3600         an hour per target
#   FUZZ_TARGETS="card" fuzz/run.sh 600
#
# A failing input is saved as fuzz/artifacts/TARGET/crash-* (or timeout-*, oom-*); replay it
# with `RUSTC_BOOTSTRAP=1 cargo fuzz run -O TARGET fuzz/artifacts/TARGET/crash-...`. Inputs that
# found new coverage go to fuzz/work/TARGET (not committed). Needs cargo-fuzz
# (`cargo install cargo-fuzz --locked`, which `./crashmon setup` does) and a C++ compiler for
# libFuzzer itself (g++).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

BUDGET="${1:-60}"
read -r -a TARGETS <<<"${FUZZ_TARGETS:-card vfio_messages recovery}"
[[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "usage: fuzz/run.sh [seconds-per-target]" >&2; exit 2; }
if ! command -v cargo-fuzz >/dev/null && [ -x "$HOME/.cargo/bin/cargo-fuzz" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo-fuzz >/dev/null || { echo "fuzz/run.sh: cargo-fuzz missing: cargo install cargo-fuzz --locked" >&2; exit 1; }

# cargo-fuzz passes nightly-only flags (-Zsanitizer=address, sanitizer coverage); this project
# builds with a stable toolchain, as windows-driver/build.sh does for -Zbuild-std.
export RUSTC_BOOTSTRAP=1
# The fuzz workspace keeps its own target folder even when the caller set one for the main
# workspace: its artifacts are built with different flags.
export CARGO_TARGET_DIR="$PWD/target"

echo "==> cargo fuzz build -O (address sanitizer, debug assertions)" >&2
cargo fuzz build -O

# The vendored vfio_user no longer panics on any message: a panic in it is a crash like any other.
export CRASHMON_FUZZ_VFIO_PANICS=abort
status=0
summary=()
for target in "${TARGETS[@]}"; do
    mkdir -p "work/$target" "artifacts/$target"
    log="work/$target.log"
    echo "==> fuzzing $target for ${BUDGET}s (log: fuzz/$log)" >&2
    # -timeout: one input taking 20 s is a hang (a writer or the server loop stuck);
    # -rss_limit_mb: the limit holds per process, inputs are small.
    extra=()
    if cargo fuzz run -O "$target" "work/$target" "corpus/$target" -- \
        -max_total_time="$BUDGET" -timeout=20 -rss_limit_mb=2048 -print_final_stats=1 \
        "${extra[@]}" >"$log" 2>&1; then
        result=ok
    else
        result=FAILED
        status=1
        tail -n 60 "$log" >&2
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    summary+=("$(printf '%-14s %-6s %10s execs %6s execs/s' "$target" "$result" "${execs:-?}" "${rate:-?}")")
done
printf 'fuzz: %s\n' "${summary[@]}" >&2
exit "$status"
