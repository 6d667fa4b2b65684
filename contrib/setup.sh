#!/usr/bin/env bash
# contrib/setup.sh - install everything relayd needs to build and test, on Debian 12.
#
# Idempotent: packages already installed are not touched, and apt-get update runs only when
# something is missing.  Installing Postfix must not leave a system Postfix running (the
# tests start their own instances on private ports), so while apt-get runs a policy-rc.d
# forbids starting services, and a system Postfix that was not running before and runs
# afterwards is stopped with "postfix stop".
#
# Usage: contrib/setup.sh        (needs root, or sudo)
set -euo pipefail

PKGS=(
    build-essential cmake pkg-config
    libuv1-dev libgnutls28-dev gnutls-bin
    libsasl2-dev libsasl2-modules libsasl2-modules-db sasl2-bin
    liblmdb-dev lmdb-utils libcriterion-dev libinih-dev
    postfix swaks libnet-ssleay-perl   # swaks needs Net::SSLeay for --tls (only a Recommends)
    ca-certificates python3 clang libclang-rt-14-dev   # clang + libFuzzer runtime: tests/fuzz
    libcurl4-gnutls-dev                # OAuth 2.0 token endpoints (relayd/oauth2.c)
    python3-aiosmtpd python3-cryptography  # OAuth 2.0 e2e: XOAUTH2 SMTP server, JWT checks
    libgmime-3.0-dev                   # MIME parsing for the Graph large-message path
    dpkg-dev                           # dpkg-shlibdeps for the .deb (CPack)
    haproxy                            # e2e: several relays behind HAProxy (PROXY v2)
    prometheus                         # promtool check metrics (e2e of /metrics)
)

missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done
if [ "${#missing[@]}" -eq 0 ]; then
    echo "setup: all ${#PKGS[@]} packages are installed"
    exit 0
fi
echo "setup: installing ${missing[*]}"

SUDO=
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "setup: need root (or sudo) to install" >&2; exit 1; }
    SUDO=sudo
fi

postfix_running() {
    local f=/var/spool/postfix/pid/master.pid pid
    [ -s "$f" ] || return 1
    pid=$(tr -d ' \n' < "$f")
    [ -n "$pid" ] && $SUDO kill -0 "$pid" 2>/dev/null
}

was_running=0
postfix_running && was_running=1

# Keep invoke-rc.d from starting daemons during the install (exit 101 = "action forbidden").
made_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\n# temporary, from relayd contrib/setup.sh\nexit 101\n' |
        $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod 0755 /usr/sbin/policy-rc.d
    made_policy=1
fi
cleanup() {
    if [ "$made_policy" -eq 1 ]; then
        $SUDO rm -f /usr/sbin/policy-rc.d
    fi
}
trap cleanup EXIT

# A fresh Postfix asks what kind of mail system this is; "Local only" listens on loopback
# only should anything ever start it.
if ! dpkg-query -W -f='${Status}\n' postfix 2>/dev/null | grep -q 'install ok installed'; then
    printf '%s\n' \
        'postfix postfix/main_mailer_type select Local only' \
        'postfix postfix/mailname string localhost' | $SUDO debconf-set-selections
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"

if [ "$was_running" -eq 0 ] && postfix_running; then
    echo "setup: the install started the system Postfix; stopping it"
    $SUDO postfix stop || true
fi
echo "setup: done"
