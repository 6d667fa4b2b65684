#!/usr/bin/env bash
# t_dev_ise: a network appliance (Cisco ISE style): EHLO, STARTTLS, EHLO, AUTH LOGIN, mail;
# and its "Test Connection" button, which only connects, says EHLO and QUITs: relayd logs
# no error for it and spools nothing.  Plaintext pipelined behind STARTTLS is discarded
# (no command injection), and AUTH is not offered before TLS.
source "$(dirname "$0")/lib.sh"

ISE_PW='ise-Secret.3'
start_postfix_upstream
printf '%s\n' "$ISE_PW" | saslpasswd2 -p -c -f "$T/relayd-sasldb" -u example.com ise
write_relayd_conf "$T/relayd.conf"
relayd_conf "$T/relayd.conf" "listener lan" "tls = starttls
cert = $T/ca/server.pem
key = $T/ca/server.key
auth = required
sasldb = $T/relayd-sasldb"
start_relayd "$T/relayd.conf"

say "1: Test Connection: connect, EHLO, QUIT"
smtp_dialogue <<'S' || fail "Test Connection dialogue failed"
< 220
> EHLO ise-psn01.example.net
<~ ^250[- ]STARTTLS$
> QUIT
< 221
eof 5
S
sleep 0.5
# (The tests run relayd as root on purpose: lib.sh says run_as_root = yes, which warns.)
if grep -iE 'error|warn|fail' "$T/relayd.log" | grep -v 'running as root: run_as_root = yes'; then
    fail "relayd logged a problem for a plain connect/EHLO/QUIT"
fi
[ "$(spool_count)" -eq 0 ] || fail "Test Connection left something in the spool"

say "2: before TLS no AUTH is offered or taken; plaintext after STARTTLS is discarded"
smtp_dialogue <<'S' || fail "STARTTLS dialogue failed"
< 220
> EHLO ise-psn01.example.net
< 250
> AUTH LOGIN
<~ ^5[0-9][0-9] 
>raw STARTTLS\r\nNOOP\r\n
< 220
tls
noeof 1
> EHLO ise-psn01.example.net
<~ ^250[- ]AUTH( [A-Z0-9-]+)* LOGIN( |$)
> AUTH LOGIN
< 334 VXNlcm5hbWU6
>b64 ise@example.com
< 334 UGFzc3dvcmQ6
>b64 ise-Secret.3
<~ ^235 2\.7\.0
> QUIT
< 221
S

say "3: swaks --tls --auth LOGIN: the message arrives upstream"
printf 'Alarm Name: ISE Authentication Inactivity\nSeverity: WARNING\n' > "$T/want.body"
printf 'From: ise@example.net\nTo: user@example.com\nSubject: ISE Alarm : Warning\n\nAlarm Name: ISE Authentication Inactivity\nSeverity: WARNING' > "$T/ise.eml"
send_swaks "$RELAYD_PORT" --ehlo ise-psn01.example.net --tls --auth LOGIN \
    --auth-user ise@example.com --auth-password "$ISE_PW" \
    --from ise@example.net --to user@example.com --data "@$T/ise.eml" ||
    fail "swaks --tls --auth LOGIN failed (swaks.log)"
f=$(wait_for_subject "ISE Alarm : Warning" 30) || fail "the ISE alarm did not arrive upstream"
assert_repaired "$f"
assert_body "$f" "$T/want.body"
grep -qE 'with ESMTPS' "$f" || fail "the Received: header does not say the session used TLS"
grep -qF "$ISE_PW" "$T/relayd.log" && fail "the password appears in relayd's log"
pass
