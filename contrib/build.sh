#!/usr/bin/env bash
# contrib/build.sh - configure and build relayd.
#
# Usage: contrib/build.sh              -> build/       (RelWithDebInfo)
#        contrib/build.sh --sanitize   -> build-asan/  (AddressSanitizer + UBSan)
#        contrib/build.sh --tsan       -> build-tsan/  (ThreadSanitizer; only the tests/tsan
#                                                       drivers of the spool writer thread)
# Extra arguments after the option go to cmake's configure step.  CMakePresets.json has the
# same builds for IDEs and `cmake --preset`.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=build
opts=()
target=()
case "${1:-}" in
    --sanitize)
        dir=build-asan
        opts+=(-DRELAYD_SANITIZE=ON)
        shift
        ;;
    --tsan)
        dir=build-tsan
        opts+=(-DRELAYD_TSAN=ON)
        target=(--target tsan_tests)
        shift
        ;;
esac
jobs=$(nproc 2>/dev/null || echo 2)

cmake -S . -B "$dir" "${opts[@]}" "$@"
cmake --build "$dir" -j "$jobs" "${target[@]}"
if [ ${#target[@]} -gt 0 ]; then
    echo "build.sh: built the ThreadSanitizer tests in $dir"
else
    echo "build.sh: built $dir/relayd and $dir/relayctl"
fi
