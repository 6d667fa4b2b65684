#!/usr/bin/env bash
# t_tls_verify: relayd refuses an upstream whose certificate it cannot verify (signed by an
# untrusted CA, issued for another name, expired): it sends no AUTH (the password never
# leaves), delivers nothing, and says "certificate" (or why) in relayctl's output.
source "$(dirname "$0")/lib.sh"

# check_case CERT PATTERN: the upstream presents CERT; relayd's error must match PATTERN.
check_case() {
    local cert=$1 pattern=$2 id err
    say "case $cert"
    stop_relayd
    stop_postfix_upstream
    rm -rf "$T/spool" "$MAILDIR"
    rm -f "$PF_DIR/maillog"
    start_postfix_upstream "$cert"
    start_relayd "$T/relayd.conf"
    make_message "$T/$cert.eml" "e2e tls $cert"
    relay_send "$T/$cert.eml" user@example.com || fail "$cert: relayd did not accept the message"
    id=$(wait_for_attempt 30) ||
        { queue_json >&2 || true; fail "$cert: no failed delivery attempt within 30s"; }
    err=$(queue_field "$id" last_error)
    say "   $id: $(queue_field "$id" state): $err"
    relayctl show "$id" > "$T/show-$cert.txt" || fail "$cert: relayctl show failed"
    grep -qiE "$pattern" "$T/show-$cert.txt" || {
        cat "$T/show-$cert.txt" >&2; fail "$cert: relayctl show does not match /$pattern/"; }
    printf '%s' "$err" | grep -qiE "$pattern" || fail "$cert: last_error does not match /$pattern/"
    # Postfix logs the TLS failure or a lost connection, but never a SASL exchange.
    postfix_saw_auth && fail "$cert: relayd sent AUTH to an unverified upstream"
    [ "$(maildir_count)" -eq 0 ] || fail "$cert: mail was delivered to an unverified upstream"
    check_relayd_exit
}

make_ca
PF_DIR=$T/postfix
write_relayd_conf "$T/relayd.conf"

check_case evil 'certificate'
check_case wrongname 'certificate|name'
check_case expired 'certificate|expired'

# And the control: the same setup with the good certificate delivers.
say "case server (control)"
stop_postfix_upstream
rm -rf "$T/spool" "$MAILDIR"
start_postfix_upstream server
start_relayd "$T/relayd.conf"
make_message "$T/ok.eml" "e2e tls ok"
relay_send "$T/ok.eml" user@example.com || fail "control: relayd did not accept the message"
wait_for_maildir_count 1 30 || fail "control: not delivered with the good certificate"
pass
