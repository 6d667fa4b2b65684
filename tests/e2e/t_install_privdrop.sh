#!/usr/bin/env bash
# t_install_privdrop: cmake --install into a DESTDIR puts relayd, relayctl, the unit, the man
# pages and /etc/relayd/relayd.conf where they belong, and the installed unit passes
# systemd-analyze verify.  relayd run from there as root with user = nobody binds, opens the
# spool (now owned by nobody), drops to nobody (/proc: every Uid and Gid non-zero, CapEff 0)
# before serving, tells $NOTIFY_SOCKET READY=1 / RELOADING=1 / STOPPING=1, and relays a
# message; a secret it could not read again is named with the chown that fixes it.  As root
# with user = root or a user that does not exist, and no run_as_root, it refuses to start;
# with stderr as the journal ($JOURNAL_STREAM) its lines carry <N> priorities.  A hard link
# planted in the spool makes a root start refuse; an operator's group on a spool file stays.
source "$(dirname "$0")/lib.sh"

DEST=$T/dest
say "1: cmake --install --prefix /usr into $DEST"
install_relayd "$DEST" "$T/install.log"
for f in usr/sbin/relayd usr/sbin/relayctl usr/lib/systemd/system/relayd.service \
    usr/share/man/man8/relayd.8 usr/share/man/man8/relayctl.8 usr/share/man/man5/relayd.conf.5 \
    etc/relayd/relayd.conf; do
    [ -f "$DEST/$f" ] || fail "cmake --install did not install /$f"
done
[ -x "$DEST/usr/sbin/relayd" ] || fail "/usr/sbin/relayd is not executable"
[ "$(stat -c %a "$DEST/etc/relayd/relayd.conf")" = 640 ] ||
    fail "relayd.conf mode $(stat -c %a "$DEST/etc/relayd/relayd.conf"), want 640"
grep -q '^ExecStart=/usr/sbin/relayd -c /etc/relayd/relayd.conf$' \
    "$DEST/usr/lib/systemd/system/relayd.service" || fail "the unit's ExecStart= is not /usr/sbin"
# A second install keeps the administrator's configuration.
echo '; local change' >> "$DEST/etc/relayd/relayd.conf"
install_relayd "$DEST" "$T/install2.log"
grep -q '^; local change$' "$DEST/etc/relayd/relayd.conf" || fail "a reinstall overwrote relayd.conf"

say "2: systemd-analyze verify of the installed unit"
mkdir -p "$T/unit"
sed "s|/usr/sbin/relayd|$DEST/usr/sbin/relayd|" "$DEST/usr/lib/systemd/system/relayd.service" \
    > "$T/unit/relayd.service"
MANPATH=$DEST/usr/share/man systemd-analyze verify "$T/unit/relayd.service" > "$T/verify.log" 2>&1 ||
    { cat "$T/verify.log" >&2; fail "systemd-analyze verify failed"; }

say "3: refusals as root"
mkdir -p "$T/spool-refuse"
cat > "$T/refuse.conf" <<EOC
[relayd]
spool = $T/spool-refuse
user = root
[listener lan]
listen = 127.0.0.1:$(free_port)
EOC
if "$DEST/usr/sbin/relayd" -c "$T/refuse.conf" > "$T/refuse.log" 2>&1; then
    fail "relayd ran as root with user = root"
fi
grep -q 'fatal: user = root is root: .*run_as_root = yes' "$T/refuse.log" ||
    { cat "$T/refuse.log" >&2; fail "no clear refusal for user = root"; }
sed -i 's/^user = root$/user = relayd-e2e-no-such-user/' "$T/refuse.conf"
if "$DEST/usr/sbin/relayd" -c "$T/refuse.conf" > "$T/refuse.log" 2>&1; then
    fail "relayd ran as root with a user that does not exist"
fi
grep -q 'fatal: started as root, but user relayd-e2e-no-such-user does not exist' "$T/refuse.log" ||
    { cat "$T/refuse.log" >&2; fail "no clear refusal for a missing user"; }
[ -e "$T/spool-refuse/data.mdb" ] && fail "a refused start created the spool"
# Under systemd, stderr is the journal: $JOURNAL_STREAM names it and lines carry "<N>".
: > "$T/journal.log"
JOURNAL_STREAM=$(stat -c '%d:%i' "$T/journal.log") "$DEST/usr/sbin/relayd" -c "$T/refuse.conf" \
    2>> "$T/journal.log" && fail "relayd ran as root with a user that does not exist"
grep -q '^<3>fatal: started as root' "$T/journal.log" ||
    { cat "$T/journal.log" >&2; fail "no <3> priority prefix with stderr as the journal"; }
grep -qv '^<[0-7]>' "$T/journal.log" && fail "a line without a priority prefix"

say "4: started as root, relayd becomes nobody before serving"
FAKE_PORT=$(free_port)
start_fake_upstream "$FAKE_PORT" "$T/fake"
write_fake_relayd_conf "$T/relayd.conf" "$FAKE_PORT"
cp "$T/relayd.conf" "$T/root.conf"
relayd_conf "$T/root.conf" relayd "run_as_root = yes"
start_relayd "$T/root.conf"
stop_relayd
relayd_conf "$T/relayd.conf" relayd "user = nobody"
# A spool root created earlier (run_as_root): relayd must give it to its user.
[ "$(stat -c %U "$T/spool/data.mdb")" = root ] || fail "the spool was not root's to begin with"
# What systemd would read (Type=notify): a datagram socket the dropped relayd may write to.
python3 - "$T/notify.sock" "$T/notify.log" > /dev/null 2>&1 <<'PY' &
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
os.chmod(sys.argv[1], 0o666)
with open(sys.argv[2], "a") as log:
    while True:
        log.write(s.recv(4096).decode().replace("\n", " ") + "\n")
        log.flush()
PY
E2E_PIDS+=($!)
for ((i = 0; i < 50; i++)); do [ -S "$T/notify.sock" ] && break; sleep 0.1; done
[ -S "$T/notify.sock" ] || fail "notify socket not created"
RELAYD_BIN=$DEST/usr/sbin/relayd
# LeakSanitizer cannot stop the world of a process that setuid() made non-dumpable.
export ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0
NOTIFY_SOCKET=$T/notify.sock start_relayd "$T/relayd.conf"
# The port opens at listen(), before the drop; READY=1 comes after it.
for ((i = 0; i < 150; i++)); do grep -q '^READY=1' "$T/notify.log" 2> /dev/null && break; sleep 0.1; done
grep -q '^READY=1 STATUS=accepting mail' "$T/notify.log" || fail "no READY=1 on the notify socket"
grep -q 'privileges dropped: user=nobody uid=65534' "$T/relayd.log" ||
    { cat "$T/relayd.log" >&2; fail "no 'privileges dropped' line"; }
for field in Uid Gid; do
    ids=$(awk -v f="$field:" '$1 == f { print $2, $3, $4, $5 }' "/proc/$RELAYD_PID/status")
    for id in $ids; do [ "$id" != 0 ] || fail "$field still has 0: $ids"; done
    say "   $field: $ids"
done
cap=$(awk '$1 == "CapEff:" { print $2 }' "/proc/$RELAYD_PID/status")
[ "$cap" = 0000000000000000 ] || fail "CapEff is $cap, want 0"
cap=$(awk '$1 == "CapPrm:" { print $2 }' "/proc/$RELAYD_PID/status")
[ "$cap" = 0000000000000000 ] || fail "CapPrm is $cap, want 0"
groups=$(awk '$1 == "Groups:" { $1 = ""; print }' "/proc/$RELAYD_PID/status")
case " $groups " in *" 0 "*) fail "supplementary group 0 kept: $groups" ;; esac
for f in "$T/spool" "$T/spool/data.mdb" "$T/spool/lock.mdb"; do
    [ "$(stat -c %U "$f")" = nobody ] || fail "$f belongs to $(stat -c %U "$f"), want nobody"
done
grep -q "password_file $T/provider.secret is not readable by user nobody.*fix: chown nobody $T/provider.secret" \
    "$T/relayd.log" || fail "no warning naming the chown for the unreadable secret"

make_message "$T/m1.eml" "e2e privdrop"
relay_send "$T/m1.eml" user@example.com || fail "relayd (as nobody) did not accept the message"
wait_for_fake_count "$T/fake" 1 20 || fail "message not relayed by relayd running as nobody"
wait_for_queue_empty 15 || fail "queue not empty after delivery"

# A full reload reads every secret again as nobody: the fix the warning named makes it work.
chown nobody "$T/provider.secret"
kill -HUP "$RELAYD_PID"
for ((i = 0; i < 50; i++)); do grep -q 'STATUS=reloaded' "$T/notify.log" && break; sleep 0.1; done
grep -q '^RELOADING=1' "$T/notify.log" || fail "no RELOADING=1 on SIGHUP"
grep -q '^READY=1 STATUS=reloaded' "$T/notify.log" || fail "no READY=1 after the reload"
relayd_must_run
stop_relayd
[ "$RELAYD_EXIT" = 0 ] || fail "relayd exited $RELAYD_EXIT on SIGTERM"
grep -q '^STOPPING=1' "$T/notify.log" || fail "no STOPPING=1 on SIGTERM"
grep -qE '^<[0-9]>' "$T/relayd.log" && fail "priority prefixes on a file (no journal)"

say "5: the drop gives away only what the user does not own, and never a hard link"
# A hard link planted in the spool (by a compromised relayd) to a file root owns elsewhere:
# root must not chown it at the next start.
echo secret > "$T/victim" && chmod 600 "$T/victim"
ln "$T/victim" "$T/spool/planted"
chgrp users "$T/spool/data.mdb" # an operator group (README, relayctl Permissions)
if "$RELAYD_BIN" -c "$T/relayd.conf" > "$T/hardlink.log" 2>&1; then
    fail "relayd started with a hard link in its spool"
fi
grep -q 'fatal: spool .*planted (a hard link; remove it)' "$T/hardlink.log" ||
    { cat "$T/hardlink.log" >&2; fail "no clear refusal naming the hard link"; }
[ "$(stat -c %U "$T/victim")" = root ] || fail "root gave the hard-linked file to $(stat -c %U "$T/victim")"
rm -f "$T/spool/planted"
start_relayd "$T/relayd.conf"
for ((i = 0; i < 150; i++)); do grep -q ': started: ' "$T/relayd.log" && break; sleep 0.1; done
grep -q 'privileges dropped: user=nobody' "$T/relayd.log" || fail "relayd did not drop again"
stop_relayd
[ "$(stat -c %G "$T/spool/data.mdb")" = users ] ||
    fail "the drop reset data.mdb's group to $(stat -c %G "$T/spool/data.mdb")"
pass
