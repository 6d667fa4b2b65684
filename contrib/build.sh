#!/usr/bin/env bash
# contrib/build.sh - configure and build relayd.
#
# Usage: contrib/build.sh              -> build/       (RelWithDebInfo)
#        contrib/build.sh --sanitize   -> build-asan/  (AddressSanitizer + UBSan)
# Extra arguments after the option go to cmake's configure step.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=build
opts=()
if [ "${1:-}" = --sanitize ]; then
    dir=build-asan
    opts+=(-DRELAYD_SANITIZE=ON)
    shift
fi
jobs=$(nproc 2>/dev/null || echo 2)

cmake -S . -B "$dir" "${opts[@]}" "$@"
cmake --build "$dir" -j "$jobs"
echo "build.sh: built $dir/relayd and $dir/relayctl"
