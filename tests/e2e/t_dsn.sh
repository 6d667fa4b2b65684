#!/usr/bin/env bash
# t_dsn: RFC 3461 DSN parameters are kept end to end.  A client's RET=/ENVID= (MAIL) and
# NOTIFY=/ORCPT= (RCPT) are stored in the spool (relayctl show --json lists them), passed on
# to the real Postfix upstream (which offers DSN; its debug log shows the commands), and
# honoured in relayd's own notifications: a refused NOTIFY=FAILURE recipient gets a report
# with Original-Envelope-Id, Original-Recipient and, for RET=FULL, the whole message as
# message/rfc822; a refused NOTIFY=NEVER recipient gets none; with delay_warning set, a
# recipient whose NOTIFY leaves out DELAY gets no "still trying" notification.
source "$(dirname "$0")/lib.sh"

# Only these mailboxes exist upstream; anyone else at example.com gets 550 5.1.1 at RCPT.
# debug_peer_list logs every command relayd sends (the "< localhost[127.0.0.1]: " lines).
PF_EXTRA_MAIN='virtual_mailbox_maps = inline:{ good@example.com=maildir/, sender@example.com=maildir/ }
debug_peer_list = 127.0.0.1'
start_postfix_upstream
write_relayd_conf "$T/relayd.conf"
start_relayd "$T/relayd.conf"

# dsns_for ADDR: the Maildir messages to ADDR that are delivery reports, one per line.
dsns_for() {
    local f
    for f in $(maildir_files); do
        grep -qi "^Delivered-To: $1\$" "$f" || continue
        grep -q 'report-type=delivery-status' "$f" && echo "$f"
    done
    return 0
}

# queued_id: the queue id in the last dialogue's "250 2.0.0 Ok: queued as ID".
queued_id() { sed -nE 's/^S: 250 2\.0\.0 Ok: queued as ([0-9A-F]{12}).*$/\1/p' "$T/dialogue.out" | tail -n 1; }

# wait_failed ID SECONDS: 0 once ID is in state failed.
wait_failed() {
    local i
    for ((i = 0; i < $2 * 4; i++)); do
        relayd_must_run
        [ "$(queue_field "$1" state)" = failed ] && return 0
        sleep 0.25
    done
    return 1
}

say "1: RET=FULL ENVID, NOTIFY/ORCPT per recipient: kept, relayed, honoured"
smtp_dialogue <<'S' > /dev/null || fail "DSN dialogue failed (dialogue.log)"
< 220
> EHLO client.lan
<~ ^250-DSN
> MAIL FROM:<sender@example.com> RET=FULL ENVID=e2e+2Bdsn-1
< 250
> RCPT TO:<good@example.com> NOTIFY=FAILURE,DELAY ORCPT=rfc822;Good+2BOrig@example.com
< 250
> RCPT TO:<bad@example.com> NOTIFY=FAILURE ORCPT=rfc822;bad@example.com
< 250
> RCPT TO:<never@example.com> NOTIFY=NEVER
< 250
> DATA
< 354
>raw From: sender@example.com\r\nTo: good@example.com\r\nSubject: e2e dsn\r\n\r\nDSN body line 1\r\n.\r\n
< 250
> QUIT
< 221
S
id1=$(queued_id)
[ -n "$id1" ] || fail "no queue id for message 1"
wait_failed "$id1" 20 || { queue_json >&2; fail "$id1 did not end failed"; }

relayctl show --json "$id1" > "$T/show.json" || fail "relayctl show --json $id1 failed"
python3 - "$T/show.json" <<'PY' || fail "relayctl show --json lacks the DSN fields ($(cat "$T/show.json"))"
import json, sys
m = json.load(open(sys.argv[1]))
assert m["dsn_ret"] == "FULL", m["dsn_ret"]
assert m["dsn_envid"] == "e2e+dsn-1", m["dsn_envid"]   # stored xtext-decoded
r = {x["addr"]: x for x in m["rcpts"]}
assert r["good@example.com"]["dsn_notify"] == "FAILURE,DELAY", r["good@example.com"]
assert r["good@example.com"]["dsn_orcpt"] == "rfc822;Good+Orig@example.com", r["good@example.com"]
assert r["bad@example.com"]["dsn_notify"] == "FAILURE"
assert r["never@example.com"]["dsn_notify"] == "NEVER"
assert r["never@example.com"]["dsn_orcpt"] is None
assert r["good@example.com"]["status"] == "sent" and r["bad@example.com"]["status"] == "failed"
PY
relayctl show "$id1" | grep -q '^dsn: *ret=FULL envid=e2e+dsn-1$' ||
    fail "relayctl show does not print the DSN parameters"

ml=$PF_DIR/maillog
grep -qE '< localhost\[127\.0\.0\.1\]: MAIL FROM:<sender@example\.com>.* RET=FULL ENVID=e2e\+2Bdsn-1' "$ml" ||
    fail "the upstream did not get RET=FULL ENVID= on MAIL"
grep -qE '< localhost\[127\.0\.0\.1\]: RCPT TO:<good@example\.com> NOTIFY=FAILURE,DELAY ORCPT=rfc822;Good\+2BOrig@example\.com' "$ml" ||
    fail "the upstream did not get NOTIFY=/ORCPT= on RCPT"
grep -qE '< localhost\[127\.0\.0\.1\]: RCPT TO:<never@example\.com> NOTIFY=NEVER' "$ml" ||
    fail "the upstream did not get NOTIFY=NEVER"

for ((i = 0; i < 80; i++)); do
    relayd_must_run
    [ -n "$(dsns_for sender@example.com)" ] && break
    sleep 0.25
done
dsn=$(dsns_for sender@example.com | head -n 1)
[ -n "$dsn" ] || fail "no delivery report reached sender@example.com"
grep -q '^Original-Envelope-Id: e2e+dsn-1$' "$dsn" || fail "no Original-Envelope-Id"
grep -q '^Original-Recipient: rfc822;bad@example.com$' "$dsn" || fail "no Original-Recipient"
grep -q '^Final-Recipient: rfc822; bad@example.com$' "$dsn" || fail "bad@ not reported"
grep -q 'never@example.com' <(sed -n '/^Final-Recipient/p' "$dsn") &&
    fail "the NOTIFY=NEVER recipient was reported"
grep -q '^Content-Type: message/rfc822' "$dsn" || fail "RET=FULL: no message/rfc822 part"
grep -q '^DSN body line 1' "$dsn" || fail "RET=FULL: the original body was not returned"
grep -q "$id1: no non-delivery notification for 1 recipient: NOTIFY" "$T/relayd.log" ||
    fail "no log line for the NOTIFY=NEVER recipient"
grep -q "$id1: from=<sender@example.com> .*dsn_ret=FULL dsn_envid=e2e+2Bdsn-1 dsn_rcpts=3" \
    "$T/relayd.log" || fail "the arrival log line lacks the DSN parameters"

say "2: bad DSN values refused; only a refused NOTIFY=NEVER recipient: failed, no notification"
smtp_dialogue <<'S' > /dev/null || fail "NEVER dialogue failed (dialogue.log)"
< 220
> EHLO client.lan
< 250
> MAIL FROM:<sender@example.com> ENVID=nul+00
< 501
> MAIL FROM:<sender@example.com> RET=HDRS
< 250
> RCPT TO:<never@example.com> ORCPT=rfc=822;never@example.com
< 501
> RCPT TO:<never@example.com> NOTIFY=NEVER,FAILURE
< 501
> RCPT TO:<never@example.com> NOTIFY=NEVER
< 250
> DATA
< 354
>raw Subject: e2e dsn never\r\n\r\nbody\r\n.\r\n
< 250
> QUIT
< 221
S
id2=$(queued_id)
[ -n "$id2" ] || fail "no queue id for message 2"
wait_failed "$id2" 20 || { queue_json >&2; fail "$id2 did not end failed"; }
grep -q "$id2: no non-delivery notification for 1 recipient: NOTIFY" "$T/relayd.log" ||
    fail "no log line for message 2's NOTIFY=NEVER recipient"
grep -q "$id2: sender non-delivery notification" "$T/relayd.log" &&
    fail "a notification was sent for a NOTIFY=NEVER recipient"
sleep 1
[ "$(dsns_for sender@example.com | grep -c .)" -eq 1 ] || fail "more than one report arrived"

say "3: delay_warning: NOTIFY=FAILURE (no DELAY) gets no 'still trying' notification"
stop_relayd
stop_postfix_upstream
relayd_conf "$T/relayd.conf" relayd "delay_warning = 1s"
start_relayd "$T/relayd.conf"
smtp_dialogue <<'S' > /dev/null || fail "delay dialogue failed (dialogue.log)"
< 220
> EHLO client.lan
< 250
> MAIL FROM:<sender@example.com>
< 250
> RCPT TO:<good@example.com> NOTIFY=FAILURE
< 250
> DATA
< 354
>raw Subject: e2e dsn delay\r\n\r\nbody\r\n.\r\n
< 250
> QUIT
< 221
S
id3=$(queued_id)
for ((i = 0; i < 60; i++)); do
    relayd_must_run
    [ "$(queue_field "$id3" attempts)" -ge 2 ] && break
    sleep 0.25
done
[ "$(queue_field "$id3" attempts)" -ge 2 ] || fail "$id3 was not retried"
grep -q "$id3: sender delay notification" "$T/relayd.log" &&
    fail "a delay notification was sent for a recipient without NOTIFY=DELAY"
start_postfix_upstream
for ((i = 0; i < 60; i++)); do
    relayd_must_run
    grep -l '^Subject: e2e dsn delay$' $(maildir_files) >/dev/null 2>&1 && break
    sleep 0.25
done
grep -l '^Subject: e2e dsn delay$' $(maildir_files) >/dev/null 2>&1 ||
    fail "message 3 was not delivered once the upstream was back"
pass
