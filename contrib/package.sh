#!/usr/bin/env bash
# contrib/package.sh - build the Debian package relayd_VERSION_ARCH.deb.
#
# Usage: contrib/package.sh [BUILD-DIR [OUT-DIR]]
#   BUILD-DIR  a build tree to package; default: a clean release build in build-pkg/
#              (removed and configured afresh).  A sanitizer build is refused.
#   OUT-DIR    where the .deb goes; default: BUILD-DIR.
# The package installs under /usr and /etc/relayd whatever the build's own prefix; its
# Depends come from dpkg-shlibdeps (dpkg-dev); contrib/debian/ holds the maintainer
# scripts.  The last line printed is the path of the .deb.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=${1:-}
if [ -z "$dir" ]; then
    dir=build-pkg
    rm -rf "$dir"
    cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_INSTALL_PREFIX=/usr \
        -DRELAYD_TESTS=OFF > /dev/null
    cmake --build "$dir" -j "$(nproc 2> /dev/null || echo 2)" --target relayd relayctl
fi
[ -f "$dir/CPackConfig.cmake" ] || { echo "package.sh: $dir is not a configured build tree" >&2; exit 1; }
if grep -qE '^RELAYD_SANITIZE:BOOL=(ON|1|TRUE)' "$dir/CMakeCache.txt"; then
    echo "package.sh: $dir is a sanitizer build; package a normal one" >&2
    exit 1
fi
mkdir -p "${2:-$dir}"
out=$(cd "${2:-$dir}" && pwd)
dir=$(cd "$dir" && pwd)
# cpack installs the build tree into its own staging area: the build must be current.
cmake --build "$dir" --target relayd relayctl > /dev/null
(cd "$dir" && cpack -G DEB -B "$out/_CPack" --config "$dir/CPackConfig.cmake" > "$out/cpack.log" 2>&1) ||
    { cat "$out/cpack.log" >&2; echo "package.sh: cpack failed" >&2; exit 1; }
deb=$(ls -t "$out"/_CPack/relayd_*.deb | head -n 1)
mv "$deb" "$out/"
rm -rf "$out/_CPack"
echo "$out/$(basename "$deb")"
