#!/usr/bin/env bash
# t_out_send_test: relayctl send-test NAME --to ADDR queues a test message through relayd's
# normal path (listener, spool, route, upstream), prints the queue id and the outcome; a
# route that picks another upstream is warned about.
source "$(dirname "$0")/lib.sh"

start_postfix_upstream
write_relayd_conf "$T/relayd.conf"
relayd_conf "$T/relayd.conf" "upstream other" "host = 127.0.0.1
port = $(free_port)
tls = none"
start_relayd "$T/relayd.conf"

rc=0
relayctl send-test provider --to user@example.com --wait 30 > "$T/st.txt" 2>&1 || rc=$?
sed 's/^/   | /' "$T/st.txt"
[ "$rc" -eq 0 ] || fail "send-test exited $rc, want 0"
grep -qE '^queued as [0-9A-F]{12}$' "$T/st.txt" || fail "no queue id printed"
grep -q '^result: delivered' "$T/st.txt" || fail "no 'result: delivered'"
grep -q 'warning' "$T/st.txt" && fail "a warning although the route picks provider"
f=$(wait_for_subject "relayd test message via upstream provider" 10) || fail "test message not in the Maildir"
grep -qx 'X-Relayd-Test: provider' "$f" || fail "no X-Relayd-Test header"
id=$(sed -nE 's/^queued as ([0-9A-F]{12})$/\1/p' "$T/st.txt")
grep -qE "^.*$id: to=<user@example.com> relay=provider\[.*status=sent" "$T/relayd.log" ||
    fail "relayd's log has no status=sent line for $id"

# A route that goes elsewhere: warned, and the outcome still reported.
rc=0
relayctl send-test other --to user@example.com --wait 20 > "$T/st2.txt" 2>&1 || rc=$?
sed 's/^/   | /' "$T/st2.txt"
grep -qE '^warning: route default sends <user@example.com> to upstream provider, not other' \
    "$T/st2.txt" || fail "no warning about the route picking provider"
[ "$rc" -eq 0 ] || fail "send-test other exited $rc (the route's upstream delivers)"
rc=0
relayctl send-test provider > /dev/null 2>&1 || rc=$?
[ "$rc" -eq 2 ] || fail "send-test without --to exited $rc, want 2"
pass
