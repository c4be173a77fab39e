#!/usr/bin/env bash
# `make fuzz`: builds every target with LLVM's coverage instrumentation (stable Rust: the same
# -C flags cargo-fuzz passes, without a sanitizer) and runs each under libFuzzer for
# FUZZ_SECONDS (default 60). Seeds are corpus/<target>/; what a run finds is written to
# artifacts/<target>/ and the run fails: fix it, and move the input into regressions/<target>/,
# which `make test` replays from then on.
#
# FUZZ_RUNS=N (CI) runs N inputs per target instead, from the seeds alone with a fixed random
# seed: the same inputs every time, so a CI pass is repeatable rather than a lottery.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${FUZZ_SECONDS:-60}
targets=${FUZZ_TARGETS:-http1_request_head http1_chunked proxy_config route_match admission_review duration local_manifests authz_path http2_frames mux_frames}
target_dir="${CARGO_TARGET_DIR:-$(pwd)/target}/fuzz"
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
# An explicit --target keeps RUSTFLAGS off build scripts and proc macros, which run on the
# host and have no libFuzzer to link against.
host=$(rustc -vV | sed -n 's/^host: //p')
cargo build --release --locked --target "$host" --target-dir "$target_dir" --bins
bin="$target_dir/$host/release"
failed=0
for t in $targets; do
    if [ -n "${FUZZ_RUNS:-}" ]; then
        work=$(mktemp -d)
        budget=(-runs="$FUZZ_RUNS" -seed=1 -max_total_time=300)
        echo "== fuzz $t ($FUZZ_RUNS inputs, seed 1)"
    else
        work="$target_dir/corpus/$t"
        budget=(-max_total_time="$seconds")
        echo "== fuzz $t (${seconds}s)"
    fi
    mkdir -p "$work" "artifacts/$t" "regressions/$t"
    if ! "$bin/$t" "${budget[@]}" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="artifacts/$t/" -print_final_stats=1 "$work" "corpus/$t" "regressions/$t" \
        >"$target_dir/$t.log" 2>&1; then
        failed=1
        grep -E "panicked|ERROR|SUMMARY|artifact" "$target_dir/$t.log" | sed -n 1,20p
        echo "fuzz $t: FAILED (full log: $target_dir/$t.log); the input is in fuzz/artifacts/$t/"
        continue
    fi
    [ -n "${FUZZ_RUNS:-}" ] && rm -rf "$work"
    runs=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$target_dir/$t.log" | grep -Eo '[0-9]+$' || echo '?')
    cov=$(grep -Eo 'cov: [0-9]+' "$target_dir/$t.log" | tail -1 || true)
    echo "fuzz $t: ok, $runs inputs, $cov"
done
exit "$failed"
