#!/usr/bin/env bash
# contrib/format.sh - clang-format check (part of contrib/test.sh).
#
# Usage: contrib/format.sh            check every file in contrib/clang-format.files
#        contrib/format.sh --fix FILE...  format FILEs in place (then add them to the list)
# Only the listed files are checked, so that a file is formatted once, in a commit of its
# own, and not as a side effect of an unrelated change.  The last line is
# "format: N files clean, N need formatting"; the exit status is non-zero when any does.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v clang-format > /dev/null || { echo "format: clang-format is not installed"; exit 1; }
if [ "${1:-}" = --fix ]; then
    shift
    clang-format -i "$@"
    exit 0
fi
clean=0
dirty=0
while read -r f; do
    case "$f" in '' | '#'*) continue ;; esac
    if [ ! -f "$f" ]; then
        echo "format: $f is listed but missing"
        dirty=$((dirty + 1))
    elif clang-format --dry-run --Werror "$f" > /dev/null 2>&1; then
        clean=$((clean + 1))
    else
        echo "format: $f needs formatting (contrib/format.sh --fix $f; diff below)"
        clang-format "$f" | diff -u "$f" - | head -n 20 || true
        dirty=$((dirty + 1))
    fi
done < contrib/clang-format.files
echo "format: $clean files clean, $dirty need formatting"
[ "$dirty" -eq 0 ]
