#!/usr/bin/env bash
# t_state_restart: what relayd knows about its upstreams survives a restart (kept in the
# spool): an upstream paused by a provider's rate-limit reply stays paused after a stop and
# start (no delivery attempt before the window ends), and an upstream held on a wrong
# password stays held with its reason (probed at once at start, which fails again), and its
# message's wait on that fault is recorded (not counted toward max_lifetime).
source "$(dirname "$0")/lib.sh"

FAKE_PORT=$(free_port)
start_fake_upstream "$FAKE_PORT" "$T/fake" --rcpt-reply "slow@slow.test=450 4.7.28 rate limited, try later"
start_postfix_upstream
use_wrong_password
write_relayd_conf "$T/relayd.conf"
relayd_conf "$T/relayd.conf" relayd "upstream_probe_interval = 10m"
relayd_conf "$T/relayd.conf" "upstream fake" "host = 127.0.0.1" "port = $FAKE_PORT" "tls = none" \
    "connect_timeout = 5s" "command_timeout = 10s"
relayd_conf "$T/relayd.conf" "route slow" "recipient_domain = slow.test" "upstream = fake"
start_relayd "$T/relayd.conf"

make_message "$T/slow.eml" "rate limited"
relay_send "$T/slow.eml" slow@slow.test || fail "relayd did not accept the message for the fake"
make_message "$T/held.eml" "wrong password"
relay_send "$T/held.eml" user@example.com || fail "relayd did not accept the message for Postfix"
log_wait 'upstream fake: pausing all deliveries to it for 60s' 20 || fail "the 450 4.7.28 did not pause the fake"
log_wait 'upstream provider: unhealthy' 20 || fail "the wrong password did not make provider unhealthy"
conns=$(grep -cE '^conn [0-9]+ fault=' "$T/fake/conn.log")

say "   restarting relayd"
sleep 1.5 # SPOOL_STATE_FLUSH; the stop writes it too
stop_relayd
[ "$RELAYD_EXIT" = 0 ] || fail "relayd exited with $RELAYD_EXIT"
start_relayd "$T/relayd.conf"
log_wait 'upstream fake: state from before the restart: paused for [0-9]+s more' 5 ||
    fail "the fake's pause was not restored"
log_wait 'upstream provider: state from before the restart: unhealthy since [0-9]+s ago: .*(535|uthentication)' 5 ||
    fail "provider's health and reason were not restored"
say "   $(grep -h 'state from before the restart' "$T/relayd.log" | sed 's/^.*upstream /upstream /' | tr '\n' ' ')"
left=$(grep -h 'upstream fake: state from before' "$T/relayd.log" | sed -E 's/.*paused for ([0-9]+)s more.*/\1/')
[ "$left" -ge 45 ] || fail "the pause left ${left}s, want most of the 60s window"

sleep 4
now=$(grep -cE '^conn [0-9]+ fault=' "$T/fake/conn.log")
[ "$now" -eq "$conns" ] || fail "relayd connected to the paused fake $((now - conns)) time(s) after the restart"
[ "$(fake_count "$T/fake")" -eq 0 ] || fail "the fake stored a message it refused"
[ "$(maildir_count)" -eq 0 ] || fail "delivered with a wrong password"
relayctl upstreams > "$T/upstreams.txt" || fail "relayctl upstreams failed"
say "   relayctl upstreams: $(tr '\n' '|' < "$T/upstreams.txt")"
grep -qE '^fake: healthy; paused for [0-9]+s more' "$T/upstreams.txt" || fail "relayctl upstreams does not show the pause"
grep -qE '^provider: unhealthy for [0-9]+s: .*(535|uthentication).*; action: ' "$T/upstreams.txt" ||
    fail "relayctl upstreams does not show provider held with its reason"
relayctl list > "$T/list.txt" 2>&1 || true
[ "$(queue_ids | grep -c . || true)" -eq 2 ] || { cat "$T/list.txt" >&2; fail "want both messages still queued"; }
# The message held on the wrong password waits on a configuration fault: that time is not
# counted toward max_lifetime, and relayctl show says so.
for id in $(queue_ids); do relayctl show "$id"; done > "$T/show.txt"
grep -qE '^config wait: +[0-9]+s \(not counted toward max_lifetime\), waiting now' "$T/show.txt" ||
    { cat "$T/show.txt" >&2; fail "relayctl show does not show the configuration wait"; }
pass
