#!/usr/bin/env bash
# t_reload: SIGHUP re-reads the whole configuration under traffic: (a) a listener added
# takes mail, (b) a changed upstream password file takes effect (a wrong one holds the mail,
# the right one again delivers it), (c) an invalid file is refused with FILE:LINE and the
# running configuration keeps serving, and so does one whose new listener cannot bind, (d) a listener removed stops accepting while the
# other keeps working.  Every message acknowledged with 250 is delivered exactly once.
source "$(dirname "$0")/lib.sh"

RELAYD_RETRY_FIRST=1 RELAYD_RETRY_MAX=2 write_relayd_conf "$T/relayd.conf"
relayd_conf "$T/relayd.conf" relayd "upstream_probe_interval = 2s"
start_postfix_upstream
start_relayd "$T/relayd.conf"

start_load_client "$RELAYD_PORT" reload --threads 2 --per-conn 3 --pause 0.1 --size 2000 --seconds 30
wait_for_maildir_count 3 20 || fail "no mail delivered before the first reload"

# reload_ok N: sends SIGHUP and waits for "reload: ok (generation N)".
reload_ok() {
    kill -HUP "$RELAYD_PID"
    log_wait "reload: ok \(generation $1\)" 10 || fail "reload $1 not reported ok"
    say "   $(grep -E "reload: ok \(generation $1\)" "$T/relayd.log" | tail -1 | sed 's/^.*reload: /reload: /')"
}

say "(a) a listener added"
EXTRA_PORT=$(free_port)
relayd_conf "$T/relayd.conf" "listener extra" "listen = 127.0.0.1:$EXTRA_PORT" "allow = 127.0.0.0/8"
reload_ok 2
grep -qE "reload: ok \(generation 2\): listeners \+1 -0 ~0" "$T/relayd.log" ||
    fail "the reload line does not count the new listener"
make_message "$T/extra.eml" "via the extra listener"
RELAYD_PORT=$EXTRA_PORT relay_send "$T/extra.eml" user@example.com ||
    fail "the new listener did not take a message"

say "(b) the upstream's password file changed: a wrong one holds the mail"
(umask 077; printf 'not-the-password\n' > "$T/wrong.secret")
relayd_conf "$T/relayd.conf" "upstream provider" "password_file = $T/wrong.secret"
reload_ok 3
log_wait 'unhealthy.*(535|uthentication)' 20 || fail "the wrong password was not used"

say "(c) an invalid file is refused, the running configuration stays"
cp "$T/relayd.conf" "$T/relayd.conf.good"
relayd_conf "$T/relayd.conf" "listener extra" "command_timeout = banana"
kill -HUP "$RELAYD_PID"
log_wait 'reload: .*relayd\.conf:[0-9]+: .*; keeping the running configuration' 10 ||
    fail "no FILE:LINE error for the invalid file"
say "   $(grep -E 'keeping the running configuration' "$T/relayd.log" | tail -1 | sed 's/^.*reload: /reload: /')"
pid_alive "$RELAYD_PID" || fail "relayd died of an invalid reload"
make_message "$T/still.eml" "still serving"
RELAYD_PORT=$EXTRA_PORT relay_send "$T/still.eml" user@example.com ||
    fail "the extra listener went away with an invalid reload"
cp "$T/relayd.conf.good" "$T/relayd.conf"

say "(c') a new listener on a port in use fails the reload as a whole"
relayd_conf "$T/relayd.conf" "listener busy" "listen = 127.0.0.1:$PF_PORT" "allow = 127.0.0.0/8"
relayd_conf "$T/relayd.conf" "upstream provider" "password_file = $T/provider.secret"
kill -HUP "$RELAYD_PID"
log_wait "reload: listener busy: listen on 127.0.0.1:$PF_PORT: .*; keeping the running configuration" 10 ||
    fail "a port in use did not fail the reload"
sleep 1
grep -qE 'reload: ok \(generation 4\)' "$T/relayd.log" && fail "the failed reload took a generation"
grep -q 'upstream provider: healthy again' "$T/relayd.log" &&
    fail "the failed reload changed the password file anyway"
cp "$T/relayd.conf.good" "$T/relayd.conf"

say "(d) the listener removed, the right password back"
sed -i '/^\[listener extra\]$/,/^$/d' "$T/relayd.conf"
relayd_conf "$T/relayd.conf" "upstream provider" "password_file = $T/provider.secret"
reload_ok 4
grep -qE "reload: ok \(generation 4\): listeners \+0 -1 " "$T/relayd.log" ||
    fail "the reload line does not count the removed listener"
wait_for_port_closed "$EXTRA_PORT" 5 || fail "the removed listener still accepts"

stop_load_client
say "   load: $(cat "$T/client.out")"
acked=$(load_acked)
[ "$acked" -ge 20 ] || fail "only $acked messages acknowledged: too little traffic"
wait_for_queue_empty 40 || { relayctl list >&2 || true; fail "spool not empty after the reloads"; }
# Postfix may still be moving the last messages into the Maildir; the verdict below tells.
wait_for_maildir_count $((acked + 2)) 30 || true

check_acked_delivered "$T/acked" reload- 0 "$MAILDIR/new" "$MAILDIR/cur" > "$T/verdict" ||
    { cat "$T/verdict" >&2; fail "mail lost or duplicated"; }
say "   $(cat "$T/verdict")"
maildir_find "via the extra listener" > /dev/null || fail "the message through the extra listener is missing"
maildir_find "still serving" > /dev/null || fail "the message sent after the invalid reload is missing"
pass
