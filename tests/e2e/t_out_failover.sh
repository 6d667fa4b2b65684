#!/usr/bin/env bash
# t_out_failover: a route's failover list is used at once when its upstream cannot be
# reached (nothing listens) or refuses at connect (421 greeting): the mail arrives through
# the next upstream (the real Postfix) within seconds, not after a retry interval.
source "$(dirname "$0")/lib.sh"

start_postfix_upstream
DEAD=$(free_port)
BUSY=$(free_port)
start_fake_upstream "$BUSY" "$T/busy" --fault 421-greeting --fault-times 1000
RELAYD_RETRY_FIRST=60 RELAYD_RETRY_MAX=120 write_relayd_conf "$T/relayd.conf"
relayd_conf "$T/relayd.conf" "upstream dead" "host = 127.0.0.1
port = $DEAD
tls = none
connect_timeout = 3s"
relayd_conf "$T/relayd.conf" "upstream busy" "host = 127.0.0.1
port = $BUSY
tls = none
connect_timeout = 3s"
relayd_conf "$T/relayd.conf" "route to-net" "upstream = dead
failover = provider
recipient_domain = example.net"
relayd_conf "$T/relayd.conf" "route default" "upstream = busy"
relayd_conf "$T/relayd.conf" "route default" "failover = dead, provider"
start_relayd "$T/relayd.conf"

make_message "$T/dead.eml" "failover from a dead upstream"
relay_send "$T/dead.eml" user@example.net || fail "not accepted (dead primary)"
make_message "$T/busy.eml" "failover from a 421 greeting"
relay_send "$T/busy.eml" user@example.com || fail "not accepted (busy primary)"

# retry_first is 60s: only failover within the attempt can deliver this fast.
f=$(wait_for_subject "failover from a dead upstream" 25) ||
    { queue_json >&2 || true; fail "dead primary: not delivered through the failover upstream"; }
assert_body "$f" "$T/dead.eml.body"
f=$(wait_for_subject "failover from a 421 greeting" 25) ||
    { queue_json >&2 || true; fail "421 primary: not delivered through the failover upstream"; }
assert_body "$f" "$T/busy.eml.body"
grep -qE 'upstream busy failed \(421 4\.3\.2' "$T/relayd.log" || fail "the busy upstream was never tried"
grep -qE 'to=<user@example.com> relay=provider\[.*status=sent' "$T/relayd.log" ||
    fail "no status=sent through provider for the busy route"
[ "$(fake_count "$T/busy")" -eq 0 ] || fail "the busy upstream accepted mail"
wait_for_queue_empty 10 || fail "queue not empty"
[ "$(maildir_count)" -eq 2 ] || fail "$(maildir_count) messages arrived, want 2"
pass
