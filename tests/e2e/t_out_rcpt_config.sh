#!/usr/bin/env bash
# t_out_rcpt_config (issue #9, defects 1 and 3): per-recipient verdicts against a scripted
# upstream.  A first RCPT refused as the relay's own fault ("553 ... not owned by user"),
# the second accepted, DATA accepted: the refused recipient is deferred with its reply and
# the administrator's action, never logged as sent, never lost; the upstream stays healthy
# (mail to others goes on at once).  A "452 4.2.2 mailbox quota exceeded" on one RCPT
# defers that recipient only (counted), and pauses nothing.
source "$(dirname "$0")/lib.sh"

PORT=$(free_port)
start_fake_upstream "$PORT" "$T/fake" \
    --rcpt-reply 'a@example.com=553 5.7.1 <a@example.com>: Sender address rejected: not owned by user dev' \
    --rcpt-reply 'q@example.com=452 4.2.2 <q@example.com>: mailbox quota exceeded'
RELAYD_RETRY_FIRST=30 RELAYD_RETRY_MAX=60 write_fake_relayd_conf "$T/relayd.conf" "$PORT"
start_relayd "$T/relayd.conf"

say "1: 553 not owned by user on a@, 250 on b@"
make_message "$T/m1.eml" "rcpt config"
relay_send "$T/m1.eml" a@example.com,b@example.com || fail "relayd did not accept the message"
wait_for_fake_count "$T/fake" 1 20 || fail "b@ was not delivered"
log_wait 'to=<a@example.com> .*status=deferred' 10 || fail "no deferred line for a@"
grep -E 'to=<a@example.com> .*status=deferred \(553 5\.7\.1 .*not owned by user dev\) cause=relay-configuration; the administrator must: .*Send As' \
    "$T/relayd.log" > /dev/null || { grep 'to=<a@' "$T/relayd.log" >&2; fail "a@'s line lacks the reply, cause or action"; }
grep -E 'to=<a@example.com> .*status=sent' "$T/relayd.log" && fail "a@ was logged as sent"
[ "$(grep -c 'to=<b@example.com> .*status=sent' "$T/relayd.log")" -eq 1 ] || fail "b@ not logged sent once"
grep -h '^to ' "$T"/fake/msg-*.env | grep -q '^to a@example.com$' && fail "a@ reached the upstream"
id=$(queue_ids | head -n 1)
[ -n "$id" ] || fail "the message left the spool: a@ is lost"
st=$(queue_field "$id" state)
[ "$st" = deferred ] || fail "state is '$st', want deferred"
relayctl show "$id" | grep -E 'pending +<a@example.com>' > /dev/null || { relayctl show "$id" >&2; fail "a@ is not pending"; }
relayctl show "$id" | grep -E 'sent +<b@example.com>' > /dev/null || fail "b@ is not recorded as sent"
[ "$(queue_field "$id" attempts)" = 0 ] || fail "a relay configuration fault counted as an attempt"
grep -q 'unhealthy' "$T/relayd.log" && fail "one recipient's reply marked the upstream unhealthy"

say "2: the upstream still takes other mail at once"
make_message "$T/m2.eml" "other mail"
relay_send "$T/m2.eml" c@example.com || fail "relayd did not accept the second message"
wait_for_fake_count "$T/fake" 2 10 || fail "mail to c@ waited: the upstream was held for a@'s reply"

say "3: 452 4.2.2 quota on q@, 250 on d@: no pause"
make_message "$T/m3.eml" "quota"
relay_send "$T/m3.eml" q@example.com,d@example.com || fail "relayd did not accept the third message"
wait_for_fake_count "$T/fake" 3 10 || fail "d@ was not delivered"
log_wait 'to=<q@example.com> .*status=deferred \(452 4\.2\.2' 10 || fail "no deferred line for q@"
grep -q 'pausing all deliveries' "$T/relayd.log" && fail "one mailbox's quota paused the upstream"
make_message "$T/m4.eml" "after quota"
relay_send "$T/m4.eml" e@example.com || fail "relayd did not accept the fourth message"
wait_for_fake_count "$T/fake" 4 10 || fail "mail after the quota reply waited"
qid=$(relayctl list --to q@example.com --json | python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["id"])') || true
[ -n "$qid" ] || fail "the quota message is not in the spool"
[ "$(queue_field "$qid" attempts)" = 1 ] || fail "the quota deferral was not counted as an attempt"
check_relayd_exit
pass
