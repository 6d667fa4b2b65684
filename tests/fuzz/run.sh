#!/usr/bin/env bash
# tests/fuzz/run.sh - build relayd's libFuzzer targets with clang and run each for a bounded
# time under ASan + UBSan.
#
# Usage: tests/fuzz/run.sh [TARGET[=SECONDS]]...     (default: every tests/fuzz/fuzz_*.c)
#   FUZZ_SECONDS   seconds per target without its own =SECONDS (default 60)
#   FUZZ_BUILD     build directory (default build-fuzz)
#   FUZZ_JOBS      build parallelism (default nproc)
#   FUZZ_SEED      libFuzzer seed (default 1: repeatable; 0: random, for longer hunts)
# Each target starts from its seed corpus tests/fuzz/corpus/<target>/ (read only: new inputs
# go to a scratch directory) and stops after its time.  A crash, leak, sanitizer report,
# timeout or out-of-memory fails the target; its reproducer is kept in FUZZ_BUILD/artifacts/.
# The last line is "fuzz: N passed, N failed"; the exit status is non-zero when any failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
SRC=$PWD
BUILD=${FUZZ_BUILD:-build-fuzz}
SECS=${FUZZ_SECONDS:-60}
JOBS=${FUZZ_JOBS:-$(nproc 2>/dev/null || echo 2)}

command -v clang >/dev/null || { echo "fuzz: clang is not installed (contrib/setup.sh)"; exit 1; }
echo "fuzz: building into $BUILD"
if ! cmake -S . -B "$BUILD" -DCMAKE_C_COMPILER=clang -DRELAYD_FUZZ=ON \
        -DCMAKE_BUILD_TYPE=RelWithDebInfo > "$BUILD.cmake.log" 2>&1; then
    cat "$BUILD.cmake.log"
    echo "fuzz: 0 passed, 1 failed"
    exit 1
fi
rm -f "$BUILD.cmake.log"

if [ "$#" -eq 0 ]; then
    set -- $(ls tests/fuzz/fuzz_*.c | xargs -n1 basename | sed 's/\.c$//')
fi
targets=()
for arg in "$@"; do targets+=("${arg%%=*}"); done
if ! cmake --build "$BUILD" -j "$JOBS" --target "${targets[@]}" > "$BUILD/build.log" 2>&1; then
    tail -n 40 "$BUILD/build.log"
    echo "fuzz: 0 passed, ${#targets[@]} failed (build)"
    exit 1
fi

# Material the smtpd target needs for STARTTLS and real Cyrus AUTH.
work=$(mktemp -d /tmp/relayd-fuzz.XXXXXX)
trap 'rm -rf -- "$work"' EXIT
if command -v certtool >/dev/null; then
    certtool --generate-privkey --key-type ecdsa --outfile "$work/key.pem" >/dev/null 2>&1 &&
        printf 'cn = "localhost"\nexpiration_days = 2\ntls_www_server\nsigning_key\n' > "$work/tmpl" &&
        certtool --generate-self-signed --load-privkey "$work/key.pem" --template "$work/tmpl" \
            --outfile "$work/cert.pem" >/dev/null 2>&1 &&
        export FUZZ_SMTPD_CERT=$work/cert.pem FUZZ_SMTPD_KEY=$work/key.pem
fi
if command -v saslpasswd2 >/dev/null; then
    printf 'fuzz-pw\n' | saslpasswd2 -p -c -f "$work/sasldb" -u fuzz.test fuzz 2>/dev/null &&
        export FUZZ_SMTPD_SASLDB=$work/sasldb
fi

export FUZZ_TMPDIR=$work   # fuzz_smtpd's spool
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
# No leak suppressions: the one leak found in Cyrus's LOGIN plugin (a LOGIN exchange
# abandoned or given an empty user name) is kept from Cyrus by relayd itself now.
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
mkdir -p "$BUILD/artifacts"
passed=0
failed=0
for arg in "$@"; do
    t=${arg%%=*}
    secs=$SECS
    [ "$arg" != "$t" ] && secs=${arg#*=}
    corpus=$work/corpus-$t
    mkdir -p "$corpus"
    seeds=()
    [ -d "tests/fuzz/corpus/$t" ] && seeds=("tests/fuzz/corpus/$t")
    extra=()
    # relayd logs each session on stderr; libFuzzer keeps its own report and crash output.
    [ "$t" = fuzz_smtpd ] && extra=(-close_fd_mask=2 -max_len=8192)
    echo "fuzz: $t for ${secs}s"
    log=$BUILD/$t.log
    start=$(date +%s)
    # -timeout: one input may take this long; the outer timeout is a safety net.
    # A fixed seed (FUZZ_SEED, default 1) makes a run repeatable: a slower machine runs a
    # prefix of the same inputs, so what passed here passes in CI; FUZZ_SEED=0 is random.
    timeout -k 10 $((secs + 120)) "$BUILD/$t" -seed="${FUZZ_SEED:-1}" -max_total_time="$secs" -timeout=25 \
        -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$BUILD/artifacts/$t-" \
        "${extra[@]}" "$corpus" "${seeds[@]}" > "$log" 2>&1
    rc=$?
    runs=$(grep -E '^stat::number_of_executed_units:' "$log" | awk '{print $2}')
    if [ "$rc" -eq 0 ] && grep -q 'Done [0-9]* runs' "$log"; then
        echo "fuzz: $t: ok, ${runs:-?} runs in $(($(date +%s) - start))s"
        passed=$((passed + 1))
    else
        echo "fuzz: $t: FAILED (exit $rc); last lines of $log:"
        tail -n 60 "$log"
        ls "$BUILD/artifacts/$t-"* 2>/dev/null | sed 's/^/fuzz:   reproducer: /'
        failed=$((failed + 1))
    fi
done
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
