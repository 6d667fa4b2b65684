#!/usr/bin/env bash
# t_auth_fail: with a wrong password the upstream's 535 reply is recorded where the operator
# sees it (relayctl show), and nothing is delivered.
source "$(dirname "$0")/lib.sh"

start_postfix_upstream
use_wrong_password
write_relayd_conf "$T/relayd.conf"
start_relayd "$T/relayd.conf"

make_message "$T/m1.eml" "e2e wrong password"
relay_send "$T/m1.eml" user@example.com || fail "relayd did not accept the message"

# The first attempt normally gets the 535; poll relayctl show for a while so that a retry
# after an unrelated transient failure still counts.
say "waiting for the upstream's 535 to show in relayctl show"
id=$(wait_for_attempt 30) || { queue_json >&2 || true; fail "no failed attempt recorded in 30s"; }
for ((i = 0; i < 40; i++)); do
    relayd_must_run
    relayctl show "$id" > "$T/show.txt" || fail "relayctl show $id failed"
    grep -q '535' "$T/show.txt" && break
    sleep 1
done
cat "$T/show.txt"
grep -q '535' "$T/show.txt" || fail "relayctl show does not carry the upstream's 535 after 40s"
say "   $id is $(queue_field "$id" state): $(queue_field "$id" last_error)"
grep -q 'authentication failed' "$PF_DIR/maillog" || fail "upstream logged no failed AUTH"
sleep 1
[ "$(maildir_count)" -eq 0 ] || fail "something was delivered with a wrong password"
pass
