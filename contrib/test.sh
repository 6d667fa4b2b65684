#!/usr/bin/env bash
# contrib/test.sh - the whole test suite, as CI runs it.
#
# Installs the dependencies (contrib/setup.sh), checks the formatting of the files listed in
# contrib/clang-format.files (contrib/format.sh, one test), builds relayd normally into build/
# and runs every unit and end-to-end test there with ctest, then does the same with
# AddressSanitizer and UndefinedBehaviorSanitizer in build-asan/, then builds and runs the
# spool writer thread's ThreadSanitizer drivers (tests/tsan/) in build-tsan/.  Exits
# non-zero if anything failed; the last line is "summary: N passed, N failed".  The
# end-to-end tests start real Postfix instances on loopback ports and need root.  Finally the libFuzzer targets are built with
# clang (build-fuzz/) and each runs for a bounded time (tests/fuzz/run.sh): 45 s for the
# command parser (fuzz_smtpd) and the DATA/header repair (fuzz_msgfix), FUZZ_OTHER_SECONDS
# (default 15) for the others; each target counts as one test.  FUZZ=0 skips this step.
set -euo pipefail
cd "$(dirname "$0")/.."

jobs=$(nproc 2>/dev/null || echo 2)
total_pass=0
total_fail=0
status=0

# run_ctest DIR LABEL: runs ctest in DIR, adds its counts to the totals.
run_ctest() {
    local dir=$1 label=$2 log rc=0 line failed total
    log=$(mktemp)
    (cd "$dir" && ctest --output-on-failure -j "$jobs") 2>&1 | tee "$log" || rc=$?
    line=$(grep -E 'tests passed, [0-9]+ tests? failed out of [0-9]+' "$log" | tail -n 1 || true)
    rm -f "$log"
    if [ -z "$line" ]; then
        echo "test.sh: $label: ctest ran no test or did not finish (rc=$rc)"
        total_fail=$((total_fail + 1))
        status=1
        return 0
    fi
    failed=$(sed -E 's/.* ([0-9]+) tests? failed out of ([0-9]+).*/\1/' <<<"$line")
    total=$(sed -E 's/.* ([0-9]+) tests? failed out of ([0-9]+).*/\2/' <<<"$line")
    echo "test.sh: $label: $((total - failed)) passed, $failed failed"
    total_pass=$((total_pass + total - failed))
    total_fail=$((total_fail + failed))
    if [ "$rc" -ne 0 ] || [ "$failed" -ne 0 ]; then
        status=1
    fi
}

bash contrib/setup.sh

echo "test.sh: === format (clang-format) ==="
if bash contrib/format.sh; then
    total_pass=$((total_pass + 1))
else
    total_fail=$((total_fail + 1))
    status=1
fi

echo "test.sh: === build (RelWithDebInfo) ==="
bash contrib/build.sh
echo "test.sh: === tests (build/) ==="
run_ctest build normal

echo "test.sh: === build (ASan + UBSan) ==="
bash contrib/build.sh --sanitize
echo "test.sh: === tests (build-asan/) ==="
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
run_ctest build-asan sanitize

echo "test.sh: === build (ThreadSanitizer: the spool writer thread) ==="
bash contrib/build.sh --tsan
echo "test.sh: === tests (build-tsan/) ==="
run_ctest build-tsan tsan

# run_fuzz: the fuzz targets, bounded; adds run.sh's counts to the totals.
run_fuzz() {
    local log rc=0 line other=${FUZZ_OTHER_SECONDS:-15} targets=() f t
    for f in tests/fuzz/fuzz_*.c; do
        t=$(basename "$f" .c)
        case "$t" in
            fuzz_smtpd | fuzz_msgfix) targets+=("$t=${FUZZ_SECONDS:-45}") ;;
            *) targets+=("$t=$other") ;;
        esac
    done
    log=$(mktemp)
    bash tests/fuzz/run.sh "${targets[@]}" 2>&1 | tee "$log" || rc=$?
    line=$(grep -E '^fuzz: [0-9]+ passed, [0-9]+ failed' "$log" | tail -n 1 || true)
    rm -f "$log"
    if [ -z "$line" ]; then
        echo "test.sh: fuzz: run.sh did not finish (rc=$rc)"
        total_fail=$((total_fail + 1))
        status=1
        return 0
    fi
    local p f2
    p=$(sed -E 's/^fuzz: ([0-9]+) passed, ([0-9]+) failed.*/\1/' <<<"$line")
    f2=$(sed -E 's/^fuzz: ([0-9]+) passed, ([0-9]+) failed.*/\2/' <<<"$line")
    echo "test.sh: fuzz: $p passed, $f2 failed"
    total_pass=$((total_pass + p))
    total_fail=$((total_fail + f2))
    if [ "$rc" -ne 0 ] || [ "$f2" -ne 0 ]; then
        status=1
    fi
}

if [ "${FUZZ:-1}" != 0 ]; then
    echo "test.sh: === fuzz (clang + libFuzzer, ASan + UBSan, bounded) ==="
    run_fuzz
fi

echo "summary: $total_pass passed, $total_fail failed"
exit "$status"
