#!/usr/bin/env bash
# t_bounce: a recipient the real Postfix upstream refuses with 550 at RCPT makes relayd send
# an RFC 3464 notification (multipart/report, Action: failed, Status 5.1.1, the upstream's
# words) to the envelope sender, while the good recipient of the same message gets it once
# and the original stays in state failed; a null-sender message that fails bounces
# nowhere; with bounce_to set the notification goes there instead; with delay_warning set a
# message held up by a down upstream causes exactly one "delayed" notification.
source "$(dirname "$0")/lib.sh"

# Only these mailboxes exist upstream; anyone else at example.com gets "550 5.1.1 ... User
# unknown in virtual mailbox table" at RCPT (smtpd_reject_unlisted_recipient).
PF_EXTRA_MAIN='virtual_mailbox_maps = inline:{ good@example.com=maildir/, sender@example.com=maildir/,
    admin@example.com=maildir/, other@example.net=maildir/ }'
start_postfix_upstream
write_relayd_conf "$T/relayd.conf"
# A second upstream (the same Postfix) for example.net, so that one message can need two.
cat >> "$T/relayd.conf" <<EOF

[upstream second]
host = localhost
port = $PF_PORT
tls = starttls
ca_file = $T/ca/ca.pem
username = $SASL_LOGIN
password_file = $T/provider.secret

[route net]
recipient_domain = example.net
upstream = second
EOF
start_relayd "$T/relayd.conf"

# delivered_to ADDR: how many Maildir messages were delivered to ADDR.
delivered_to() {
    local f n=0
    for f in $(maildir_files); do
        grep -qi "^Delivered-To: $1\$" "$f" && n=$((n + 1))
    done
    echo "$n"
}

# dsn_for ADDR: the first Maildir message to ADDR that is a delivery report.
dsn_for() {
    local f
    for f in $(maildir_files); do
        grep -qi "^Delivered-To: $1\$" "$f" || continue
        grep -q 'report-type=delivery-status' "$f" && { echo "$f"; return 0; }
    done
    return 1
}

# wait_for_dsn ADDR SECONDS
wait_for_dsn() {
    local i
    for ((i = 0; i < $2 * 4; i++)); do
        relayd_must_run
        dsn_for "$1" > /dev/null && return 0
        sleep 0.25
    done
    return 1
}

# failed_id SUBJECT-FREE: the id of the failed message whose sender is $1 ("" for <>).
failed_id() {
    queue_json | python3 -c '
import json, sys
for m in json.load(sys.stdin):
    if m.get("state") == "failed" and (m.get("sender") or "") == sys.argv[1]:
        print(m["id"])
        break
' "$1"
}

make_message "$T/m.eml" "e2e bounce"

say "1: one good and one refused recipient: good delivered once, a DSN to the sender"
send_swaks "$RELAYD_PORT" --from sender@example.com --to good@example.com,bad@example.com \
    --data "@$T/m.eml" || fail "relayd did not accept the message (swaks.log)"
wait_for_dsn sender@example.com 20 || fail "no delivery report reached sender@example.com"
dsn=$(dsn_for sender@example.com)
grep -q '^Return-Path: <>$' "$dsn" || fail "the DSN was not sent from the null sender"
grep -q '^Content-Type: multipart/report; report-type=delivery-status;' "$dsn" ||
    fail "DSN is not a multipart/report"
grep -q '^Content-Type: message/delivery-status' "$dsn" || fail "no message/delivery-status part"
grep -q '^Content-Type: text/rfc822-headers' "$dsn" || fail "no text/rfc822-headers part"
grep -q '^Final-Recipient: rfc822; bad@example.com$' "$dsn" || fail "wrong Final-Recipient"
grep -q '^Action: failed$' "$dsn" || fail "no Action: failed"
grep -qE '^Status: 5\.[0-9]+\.[0-9]+$' "$dsn" || fail "no 5.x.x Status"
grep -q '^Diagnostic-Code: smtp; 550' "$dsn" || fail "the upstream's reply is not quoted"
grep -qi 'User unknown' "$dsn" || fail "the upstream's words are missing"
grep -q '^Subject: e2e bounce$' "$dsn" || fail "the original headers are not returned"
grep -q 'Line one of the e2e body' "$dsn" && fail "the original body was returned"
grep -q 'good@example.com' <(sed -n '/^Final-Recipient/p' "$dsn") &&
    fail "the delivered recipient was reported as failed"
grep -qE '[0-9A-F]{12}: sender non-delivery notification: [0-9A-F]{12}$' "$T/relayd.log" ||
    fail "no 'sender non-delivery notification' log line"
id=$(failed_id sender@example.com)
[ -n "$id" ] || { queue_json >&2; fail "the original is not in state failed"; }
say "   DSN delivered; original $id is failed"
sleep 1
[ "$(delivered_to good@example.com)" -eq 1 ] ||
    fail "good@example.com got $(delivered_to good@example.com) copies, want 1"

say "1b: recipients on two routes: each upstream gets its own, in one round, once"
send_swaks "$RELAYD_PORT" --from sender@example.com --to good@example.com,other@example.net \
    --data "@$T/m.eml" || fail "relayd did not accept message 1b"
for ((i = 0; i < 80; i++)); do
    relayd_must_run
    [ "$(delivered_to other@example.net)" -ge 1 ] && [ "$(delivered_to good@example.com)" -ge 2 ] &&
        break
    sleep 0.25
done
[ "$(delivered_to other@example.net)" -eq 1 ] || fail "other@example.net did not get message 1b"
[ "$(delivered_to good@example.com)" -eq 2 ] || fail "good@example.com did not get message 1b"
id1b=$(sed -nE 's/^.* ([0-9A-F]{12}): to=<other@example.net> relay=second.*status=sent.*$/\1/p' \
    "$T/relayd.log" | head -n 1)
[ -n "$id1b" ] || fail "other@example.net was not sent through upstream second"
grep -q "$id1b: to=<good@example.com> relay=provider.*status=sent" "$T/relayd.log" ||
    fail "good@example.com of $id1b was not sent through upstream provider"
grep -q "$id1b: .*status=deferred" "$T/relayd.log" && fail "$id1b was deferred"
wait_for_queue_empty_but_failed() {
    local i
    for ((i = 0; i < 40; i++)); do
        [ "$(queue_ids | grep -c .)" -eq 1 ] && return 0
        sleep 0.25
    done
    return 1
}
wait_for_queue_empty_but_failed || { queue_json >&2; fail "queue holds more than step 1's"; }

say "2: null sender, refused recipient: failed, no DSN"
before=$(maildir_count)
send_swaks "$RELAYD_PORT" --from '<>' --to bad@example.com --data "@$T/m.eml" ||
    fail "relayd did not accept the null-sender message"
for ((i = 0; i < 60; i++)); do
    relayd_must_run
    nid=$(failed_id "")
    [ -n "$nid" ] && break
    sleep 0.25
done
[ -n "$nid" ] || { queue_json >&2; fail "null-sender message not failed within 15s"; }
grep -q "$nid: no non-delivery notification: null sender" "$T/relayd.log" ||
    fail "no log line saying the null sender gets no notification"
grep -q "$nid: sender non-delivery notification" "$T/relayd.log" &&
    fail "a notification was sent for a null-sender message"
sleep 2
[ "$(maildir_count)" -eq "$before" ] || fail "something was delivered for the null-sender message"

say "3: bounce_to: the DSN goes to the configured address"
stop_relayd
relayd_conf "$T/relayd.conf" relayd "bounce_to = admin@example.com"
start_relayd "$T/relayd.conf"
send_swaks "$RELAYD_PORT" --from device@lan.test --to bad@example.com --data "@$T/m.eml" ||
    fail "relayd did not accept message 3"
wait_for_dsn admin@example.com 20 || fail "no delivery report reached admin@example.com"
dsn=$(dsn_for admin@example.com)
grep -q '^X-Relayd-Sender: rfc822; device@lan.test$' "$dsn" ||
    fail "the DSN does not name the original sender"
grep -q '^To: <admin@example.com>$' "$dsn" || fail "the DSN is not addressed to bounce_to"

say "4: delay_warning: one 'still trying' notification while the upstream is down"
stop_relayd
stop_postfix_upstream
relayd_conf "$T/relayd.conf" relayd "delay_warning = 2s"
start_relayd "$T/relayd.conf"
send_swaks "$RELAYD_PORT" --from sender@example.com --to good@example.com --data "@$T/m.eml" ||
    fail "relayd did not accept message 4"
id4=
for ((i = 0; i < 80; i++)); do
    relayd_must_run
    id4=$(sed -nE 's/^.* ([0-9A-F]{12}): sender delay notification: [0-9A-F]{12}$/\1/p' \
        "$T/relayd.log" | head -n 1)
    [ -n "$id4" ] && [ "$(queue_field "$id4" attempts)" -ge 3 ] && break
    sleep 0.25
done
[ -n "$id4" ] || fail "no 'sender delay notification' within 20s"
[ "$(queue_field "$id4" attempts)" -ge 3 ] || fail "$id4 was not retried after the warning"
[ "$(grep -c "$id4: sender delay notification" "$T/relayd.log")" -eq 1 ] ||
    fail "more than one delay notification for $id4"
start_postfix_upstream
wait_for_dsn admin@example.com 1 >/dev/null  # the bounce of step 3 is there already
for ((i = 0; i < 80; i++)); do
    relayd_must_run
    grep -l '^Action: delayed$' $(maildir_files) >/dev/null 2>&1 &&
        [ "$(delivered_to good@example.com)" -ge 3 ] && break
    sleep 0.25
done
f=$(grep -l '^Action: delayed$' $(maildir_files) | head -n 1) ||
    fail "the delay notification was not delivered once the upstream was back"
grep -q '^Delivered-To: admin@example.com$' "$f" || fail "the delay notification ignored bounce_to"
grep -q '^Subject: Delayed Mail (still being retried)$' "$f" || fail "wrong delay Subject"
grep -q '^Will-Retry-Until: ' "$f" || fail "no Will-Retry-Until"
[ "$(delivered_to good@example.com)" -eq 3 ] || fail "message 4 not delivered after the warning"
relayctl show "$id4" >/dev/null 2>&1 && fail "message 4 is still in the spool"
pass
