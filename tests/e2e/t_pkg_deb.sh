#!/usr/bin/env bash
# t_pkg_deb: contrib/package.sh builds the .deb from this build tree; dpkg -i installs it
# (binaries, unit, man pages, /etc/relayd/relayd.conf 0640 root:relayd as a conffile,
# /etc/relayd 0750 root:relayd, /var/spool/relayd 0700 relayd:relayd, /var/lib/relayd 0750
# relayd:relayd, the relayd system user) with Depends from dpkg-shlibdeps, and the installed unit passes systemd-analyze
# verify.  dpkg -i over the installed package (the upgrade path) keeps an edited conffile,
# the modes and the spool.  The installed relayd, started as root, drops to relayd and holds a message in
# /var/spool/relayd.  dpkg --purge keeps a spool that holds mail (and says so) and removes
# one whose queue is empty, and removes /var/lib/relayd (refresh tokens); the relayd user stays, as Debian keeps system users.
# It changes the system (a package, a user): serialized with the other such tests by
# /tmp/relayd-system-tests.lock, skipped when relayd is installed already, and everything
# it created is removed on exit.  Sanitizer builds are not packaged: skipped there.
source "$(dirname "$0")/lib.sh"

BUILD=${RELAYD_BUILD_DIR:-$(dirname "$RELAYD_BIN")}
skip() { say "SKIP: $*"; exit 0; }
case "${RELAYD_SANITIZE:-}" in 1 | ON | on | TRUE | true) skip "sanitizer build" ;; esac
grep -qE '^RELAYD_SANITIZE:BOOL=(ON|1|TRUE)' "$BUILD/CMakeCache.txt" 2> /dev/null &&
    skip "sanitizer build"
command -v dpkg-shlibdeps > /dev/null || skip "no dpkg-shlibdeps (dpkg-dev)"

exec 9> /tmp/relayd-system-tests.lock
flock -w 240 9 || fail "could not take /tmp/relayd-system-tests.lock"
if dpkg-query -W -f='${Status}' relayd 2> /dev/null | grep -q 'installed'; then
    skip "the relayd package is installed on this machine; not touching it"
fi
[ -e /etc/relayd ] && skip "/etc/relayd exists (a source install?); not touching it"
[ -e /var/spool/relayd ] && skip "/var/spool/relayd exists; not touching it"
[ -e /var/lib/relayd ] && skip "/var/lib/relayd exists; not touching it"
USER_EXISTED=0
getent passwd relayd > /dev/null && USER_EXISTED=1

# Undo whatever this test did to the system, then lib.sh's clean-up.
pkg_cleanup() {
    set +e
    if dpkg-query -W -f='${Status}' relayd 2> /dev/null | grep -q 'installed\|config-files'; then
        dpkg --purge relayd > "$T/cleanup-purge.log" 2>&1
    fi
    rm -rf /var/spool/relayd /etc/relayd /var/lib/relayd
    if [ "$USER_EXISTED" = 0 ] && getent passwd relayd > /dev/null; then
        userdel relayd 2> /dev/null
        getent group relayd > /dev/null && groupdel relayd 2> /dev/null
    fi
}
pkg_exit() {
    local rc=$?
    pkg_cleanup
    (exit "$rc")
    e2e_cleanup
}
trap pkg_exit EXIT

say "1: contrib/package.sh $BUILD"
deb=$(bash "$E2E_SRC/contrib/package.sh" "$BUILD" "$T/pkg" 2> "$T/package.log" | tail -n 1) ||
    { cat "$T/package.log" >&2; fail "contrib/package.sh failed"; }
[ -f "$deb" ] || { cat "$T/package.log" >&2; fail "no .deb built"; }
say "   $(basename "$deb")"
dpkg-deb -f "$deb" Depends > "$T/depends"
for lib in libuv1 libgnutls30 libsasl2-2 liblmdb0 libcurl3-gnutls libinih1 libc6 adduser; do
    grep -qE "(^|, )$lib( |,|$)" "$T/depends" || fail "Depends lacks $lib: $(cat "$T/depends")"
done
[ "$(dpkg-deb -f "$deb" Package)" = relayd ] || fail "package name: $(dpkg-deb -f "$deb" Package)"
[ "$(dpkg-deb -f "$deb" Architecture)" = "$(dpkg --print-architecture)" ] || fail "architecture"

say "2: dpkg -i"
dpkg -i "$deb" > "$T/dpkg-i.log" 2>&1 || { cat "$T/dpkg-i.log" >&2; fail "dpkg -i failed"; }
for f in /usr/sbin/relayd /usr/sbin/relayctl /usr/lib/systemd/system/relayd.service \
    /usr/share/man/man8/relayd.8 /usr/share/man/man8/relayctl.8 \
    /usr/share/man/man5/relayd.conf.5 /etc/relayd/relayd.conf; do
    [ -f "$f" ] || fail "$f not installed"
done
dpkg-query -W -f='${Conffiles}\n' relayd | grep -q '/etc/relayd/relayd.conf' ||
    fail "/etc/relayd/relayd.conf is not a conffile"
getent passwd relayd > /dev/null || fail "no relayd user"
IFS=: read -r _ _ uid gid _ home shell < <(getent passwd relayd)
[ "$uid" -gt 0 ] && [ "$uid" -lt 1000 ] || fail "relayd uid $uid is not a system uid"
[ "$home" = /var/spool/relayd ] || fail "relayd's home is $home"
case "$shell" in */nologin | /bin/false) ;; *) fail "relayd's shell is $shell" ;; esac
[ "$(getent group relayd | cut -d: -f3)" = "$gid" ] || fail "relayd's primary group is not relayd"
want_mode() {
    local got
    got=$(stat -c '%a %U:%G' "$1")
    [ "$got" = "$2" ] || fail "$1 is $got, want $2"
}
want_mode /var/spool/relayd "700 relayd:relayd"
want_mode /var/lib/relayd "750 relayd:relayd"
want_mode /etc/relayd "750 root:relayd"
want_mode /etc/relayd/relayd.conf "640 root:relayd"
want_mode /usr/sbin/relayd "755 root:root"
systemd-analyze verify /usr/lib/systemd/system/relayd.service > "$T/verify.log" 2>&1 ||
    { cat "$T/verify.log" >&2; fail "systemd-analyze verify of the installed unit failed"; }
/usr/sbin/relayd --check -c /etc/relayd/relayd.conf > /dev/null 2>&1 &&
    say "   note: the example configuration passes --check as shipped"

say "2b: dpkg -i again (the upgrade path) keeps an edited conffile and the modes"
echo "# e2e: an administrator's edit" >> /etc/relayd/relayd.conf
dpkg -i "$deb" > "$T/dpkg-i-again.log" 2>&1 ||
    { cat "$T/dpkg-i-again.log" >&2; fail "dpkg -i over the installed package failed"; }
grep -q '^# e2e: an administrator' /etc/relayd/relayd.conf || fail "reinstall lost the conffile edit"
want_mode /etc/relayd/relayd.conf "640 root:relayd"
want_mode /var/spool/relayd "700 relayd:relayd"
want_mode /var/lib/relayd "750 relayd:relayd"

say "3: the installed relayd as root drops to relayd and holds a message"
RELAYD_PORT=$(free_port)
cat > "$T/site.conf" <<EOC
[relayd]
hostname = relay.test
spool = /var/spool/relayd
user = relayd
[listener lan]
listen = 127.0.0.1:$RELAYD_PORT
allow = 127.0.0.0/8
EOC
RELAYD_BIN=/usr/sbin/relayd
RELAYCTL_BIN=/usr/sbin/relayctl
start_relayd "$T/site.conf"
# The port opens at listen(), before the drop; "started:" is logged after it.
for ((i = 0; i < 150; i++)); do grep -q ': started: ' "$T/relayd.log" && break; sleep 0.1; done
grep -q 'privileges dropped: user=relayd' "$T/relayd.log" || fail "relayd did not drop to relayd"
uid_now=$(awk '$1 == "Uid:" { print $3 }' "/proc/$RELAYD_PID/status")
[ "$uid_now" = "$uid" ] || fail "relayd runs as uid $uid_now, want $uid"
make_message "$T/m1.eml" "e2e package"
relay_send "$T/m1.eml" user@example.com || fail "the installed relayd did not accept the message"
stop_relayd
[ "$RELAYD_EXIT" = 0 ] || fail "relayd exited $RELAYD_EXIT"
want_mode /var/spool/relayd/data.mdb "600 relayd:relayd"
id=$(relayctl list --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
[ -n "$id" ] || fail "no message held in /var/spool/relayd"

say "4: dpkg --purge with mail queued keeps the spool"
dpkg --purge relayd > "$T/purge1.log" 2>&1 || { cat "$T/purge1.log" >&2; fail "dpkg --purge failed"; }
grep -q 'relayd: /var/spool/relayd kept: it holds queued mail' "$T/purge1.log" ||
    { cat "$T/purge1.log" >&2; fail "purge did not say it kept the spool"; }
[ -f /var/spool/relayd/data.mdb ] || fail "purge deleted a spool holding mail"
[ -e /usr/sbin/relayd ] && fail "/usr/sbin/relayd still there after purge"
[ -e /etc/relayd ] && fail "/etc/relayd still there after purge"
[ -e /var/lib/relayd ] && fail "/var/lib/relayd (refresh tokens) still there after purge"
[ -e /etc/systemd/system/relayd.service ] && fail "purge left the unit masked"
getent passwd relayd > /dev/null || fail "purge removed the relayd user (Debian keeps it)"

say "5: reinstall, delete the message, dpkg --purge removes the empty spool"
dpkg -i "$deb" > "$T/dpkg-i2.log" 2>&1 || { cat "$T/dpkg-i2.log" >&2; fail "second dpkg -i failed"; }
[ "$(relayctl list --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')" = "$id" ] ||
    fail "the reinstall lost the queued message"
relayctl delete "$id" --yes > /dev/null || fail "relayctl delete failed"
dpkg --purge relayd > "$T/purge2.log" 2>&1 || { cat "$T/purge2.log" >&2; fail "second purge failed"; }
[ -e /var/spool/relayd ] && fail "purge kept an empty spool: $(ls -la /var/spool/relayd)"
pass
