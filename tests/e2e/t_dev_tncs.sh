#!/usr/bin/env bash
# t_dev_tncs: an alarm/management server (TNCS style).  Old firmware: HELO, spaces inside the
# angle brackets of MAIL FROM and RCPT To, a message with only To/From/Subject headers.  New
# firmware: EHLO and AUTH LOGIN (without TLS) with the exact 334 prompts.  Both messages
# arrive upstream with Date: and Message-ID: added and the body intact.
source "$(dirname "$0")/lib.sh"

start_postfix_upstream
printf 'alarm-pw.7\n' | saslpasswd2 -p -c -f "$T/relayd-sasldb" -u example.com tncs
write_relayd_conf "$T/relayd.conf"
relayd_conf "$T/relayd.conf" "listener lan" "auth = optional
auth_plaintext = yes
sasldb = $T/relayd-sasldb"
start_relayd "$T/relayd.conf"

printf 'ALARM 0042 zone 3 door open\n\nacknowledge at the console\n' > "$T/want1.body"
say "1: old firmware: HELO, MAIL FROM: < user@example.net >, only To/From/Subject"
{ tncs_prelude; cat <<'S'; } | smtp_dialogue || fail "TNCS dialogue (old firmware) failed"
> To: user@example.net
> From: alarm@example.net
> Subject: TNCS alarm 0042
>
> ALARM 0042 zone 3 door open
>
> acknowledge at the console
> .
<~ ^250 2\.0\.0 Ok: queued as [0-9A-F]+$
> QUIT
< 221
eof 5
S
f=$(wait_for_subject "TNCS alarm 0042" 30) || fail "the old-firmware alarm did not arrive"
assert_repaired "$f"
assert_body "$f" "$T/want1.body"
grep -q '^Return-Path: <alarm@example.net>$' "$f" || fail "envelope sender lost its spaces badly"
grep -q '^Delivered-To: user@example.net$' "$f" || fail "envelope recipient wrong"
grep -q '^From: alarm@example.net$' "$f" || fail "From: changed"
grep -qE 'from=<alarm@example.net> .*helo=TNCS-SERVER.*added=Date.*added=Message-ID' \
    "$T/relayd.log" || fail "relayd's log does not say it added Date and Message-ID"

say "2: new firmware: EHLO, AUTH LOGIN with the exact prompts, same message"
printf 'ALARM 0043 zone 1 power restored\n' > "$T/want2.body"
smtp_dialogue <<'S' || fail "TNCS dialogue (AUTH LOGIN) failed"
< 220
> EHLO TNCS-SERVER
<~ ^250[- ]AUTH( [A-Z0-9-]+)* LOGIN( |$)
> AUTH LOGIN
< 334 VXNlcm5hbWU6
>b64 tncs@example.com
< 334 UGFzc3dvcmQ6
>b64 alarm-pw.7
<~ ^235 2\.7\.0
> MAIL FROM: < alarm@example.net >
< 250
> RCPT To: < user@example.net >
< 250
> DATA
< 354
> To: user@example.net
> From: alarm@example.net
> Subject: TNCS alarm 0043
>
> ALARM 0043 zone 1 power restored
> .
< 250
> QUIT
< 221
S
f=$(wait_for_subject "TNCS alarm 0043" 30) || fail "the AUTH LOGIN alarm did not arrive"
assert_repaired "$f"
assert_body "$f" "$T/want2.body"

say "3: AUTH LOGIN with the user name as initial response; a wrong password gets 535"
smtp_dialogue <<'S' || fail "AUTH LOGIN variants failed"
< 220
> EHLO TNCS-SERVER
< 250
> AUTH LOGIN dG5jc0BleGFtcGxlLmNvbQ==
< 334 UGFzc3dvcmQ6
>b64 wrong-password
<~ ^535 5\.7\.8
> AUTH LOGIN
< 334 VXNlcm5hbWU6
>b64 tncs@example.com
< 334 UGFzc3dvcmQ6
>b64 alarm-pw.7
< 235
> QUIT
< 221
S
grep -q 'alarm-pw.7' "$T/relayd.log" && fail "the password appears in relayd's log"
pass
