#!/usr/bin/env bash
# t_ops_install (issue #11, "done when"): relayd installed with cmake --install into a
# DESTDIR and run from there as root drops to nobody before serving (/proc: Uid, Gid
# non-zero, CapEff 0); under traffic, the administrator rotates the upstream password (a
# new password in Postfix's sasldb and a new password_file) and adds a listener, and
# `relayctl reload` makes both take effect; every message acknowledged with 250 is
# delivered exactly once (real Postfix upstream, STARTTLS + SASL); /metrics counts them and
# passes promtool; /healthz says ok.
source "$(dirname "$0")/lib.sh"

DEST=$T/dest
say "1: cmake --install into $DEST"
install_relayd "$DEST" "$T/install.log"
RELAYD_BIN=$DEST/usr/sbin/relayd
RELAYCTL_BIN=$DEST/usr/sbin/relayctl
[ -x "$RELAYD_BIN" ] && [ -x "$RELAYCTL_BIN" ] || fail "relayd or relayctl not installed in sbin"
# LeakSanitizer cannot stop the world of a process that setuid() made non-dumpable.
export ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0

say "2: started as root, relayd serves as nobody"
MP=$(free_port)
RELAYD_RETRY_FIRST=1 RELAYD_RETRY_MAX=2 write_relayd_conf "$T/relayd.conf"
relayd_conf "$T/relayd.conf" relayd "user = nobody" "upstream_probe_interval = 2s" \
    "metrics = 127.0.0.1:$MP"
# What relayd reads again as nobody (a reload) must be nobody's, as the README says.
chown nobody "$T/provider.secret"
start_postfix_upstream
start_relayd "$T/relayd.conf"
log_wait 'privileges dropped: user=nobody' 10 || fail "no 'privileges dropped' line"
for field in Uid Gid; do
    ids=$(awk -v f="$field:" '$1 == f { print $2, $3, $4, $5 }' "/proc/$RELAYD_PID/status")
    for id in $ids; do [ "$id" != 0 ] || fail "$field still has 0: $ids"; done
    say "   $field: $ids"
done
cap=$(awk '$1 == "CapEff:" { print $2 }' "/proc/$RELAYD_PID/status")
[ "$cap" = 0000000000000000 ] || fail "CapEff is $cap, want 0"

start_load_client "$RELAYD_PORT" ops --threads 2 --per-conn 3 --pause 0.1 --size 2000 --seconds 30
wait_for_maildir_count 3 20 || fail "no mail delivered before the reload"

say "3: under traffic: a new upstream password, a listener added, relayctl reload"
NEW_PASSWORD='e2e-Rotated_pw.2'
printf '%s' "$NEW_PASSWORD" |
    saslpasswd2 -p -f "$PF_DIR/etc/sasl/sasldb2" -u "$SASL_REALM" "$SASL_USER" ||
    fail "saslpasswd2 could not change the upstream password"
chown root:postfix "$PF_DIR/etc/sasl/sasldb2"
chmod 0640 "$PF_DIR/etc/sasl/sasldb2"
(umask 077; printf '%s\n' "$NEW_PASSWORD" > "$T/rotated.secret")
chown nobody "$T/rotated.secret"
EXTRA_PORT=$(free_port)
relayd_conf "$T/relayd.conf" "upstream provider" "password_file = $T/rotated.secret"
relayd_conf "$T/relayd.conf" "listener extra" "listen = 127.0.0.1:$EXTRA_PORT" "allow = 127.0.0.0/8"
relayctl reload > "$T/reload.out" 2>&1 || { cat "$T/reload.out" >&2; fail "relayctl reload failed"; }
say "   relayctl: $(cat "$T/reload.out")"
log_wait 'reload: ok \(generation 2\): listeners \+1 -0 ~0' 10 || fail "the reload line is missing"
make_message "$T/extra.eml" "via the added listener"
RELAYD_PORT=$EXTRA_PORT relay_send "$T/extra.eml" user@example.com ||
    fail "the added listener did not take a message"

stop_load_client
say "   load: $(cat "$T/client.out")"
acked=$(load_acked)
[ "$acked" -ge 10 ] || fail "only $acked messages acknowledged: too little traffic"
wait_for_queue_empty 60 || { relayctl list >&2 || true; fail "spool not empty after the reload"; }
# Postfix may still be moving the last messages into the Maildir; the verdict below tells.
wait_for_maildir_count $((acked + 1)) 30 || true
check_acked_delivered "$T/acked" ops- 0 "$MAILDIR/new" "$MAILDIR/cur" > "$T/verdict" ||
    { cat "$T/verdict" >&2; fail "mail lost or duplicated"; }
say "   $(cat "$T/verdict")"
maildir_find "via the added listener" > /dev/null || fail "the message through the added listener is missing"

say "4: /metrics and /healthz"
curl -sS --max-time 10 "http://127.0.0.1:$MP/metrics" > "$T/metrics.txt" || fail "scrape failed"
promtool check metrics < "$T/metrics.txt" > "$T/promtool.out" 2>&1 ||
    { cat "$T/promtool.out" >&2; fail "promtool check metrics failed"; }
received=$(awk '$1 ~ /^relayd_messages_received_total\{/ { s += $2 } END { print s + 0 }' "$T/metrics.txt")
delivered=$(awk '$1 ~ /^relayd_recipients_delivered_total\{/ { s += $2 } END { print s + 0 }' "$T/metrics.txt")
say "   received $received, delivered $delivered (acked $acked + 1)"
[ "$received" -ge $((acked + 1)) ] || fail "relayd_messages_received_total $received < $((acked + 1))"
[ "$delivered" -ge $((acked + 1)) ] || fail "relayd_recipients_delivered_total $delivered < $((acked + 1))"
grep -q '^relayd_upstream_healthy{upstream="provider"} 1$' "$T/metrics.txt" ||
    fail "upstream provider not healthy on /metrics"
code=$(curl -sS --max-time 10 -o "$T/health.txt" -w '%{http_code}' "http://127.0.0.1:$MP/healthz")
[ "$code" = 200 ] && [ "$(cat "$T/health.txt")" = ok ] ||
    fail "/healthz: $code $(cat "$T/health.txt")"
stop_relayd
[ "$RELAYD_EXIT" = 0 ] || fail "relayd exited $RELAYD_EXIT on SIGTERM"
pass
