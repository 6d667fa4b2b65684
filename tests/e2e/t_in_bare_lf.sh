#!/usr/bin/env bash
# t_in_bare_lf: the bare_lf listener setting (SMTP smuggling vs legacy devices).
# (1) bare_lf = accept (default): "LF.LF" ends DATA, as devices need, and the log says so
# once per session; (2) bare_lf = normalize: "\n.\n" is message text, so a second message
# hidden behind it stays inside the first (one 250, the text arrives); (3) bare_lf = reject:
# 550 5.5.2 and a refusal line naming bare_lf; (4) a client in bare_lf_accept is let through
# on that same listener.
source "$(dirname "$0")/lib.sh"

start_postfix_upstream
write_relayd_conf "$T/relayd.conf"
PN=$(free_port)
PR=$(free_port)
relayd_conf "$T/relayd.conf" "listener norm" "listen = 127.0.0.1:$PN" \
    "allow = 127.0.0.0/8" \
    "bare_lf = normalize"
relayd_conf "$T/relayd.conf" "listener rej" "listen = 127.0.0.1:$PR" \
    "allow = 127.0.0.0/8" \
    "bare_lf = reject" \
    "bare_lf_accept = 127.0.0.2/32"
start_relayd "$T/relayd.conf"

say "1: accept: LF.LF ends DATA (twice in one session, logged once)"
smtp_dialogue <<'S' || fail "LF.LF did not end DATA on the default listener"
< 220
>lf HELO panel
< 250
>lf MAIL FROM:<panel@lan.test>
< 250
>lf RCPT TO:<user@example.com>
< 250
>lf DATA
< 354
>raw Subject: bare lf one\n\nALARM 1\n.\n
< 250
>lf MAIL FROM:<panel@lan.test>
< 250
>lf RCPT TO:<user@example.com>
< 250
>lf DATA
< 354
>raw Subject: bare lf two\n\nALARM 2\n.\n
< 250
>lf QUIT
< 221
S
wait_for_subject "bare lf one" 30 >/dev/null || fail "the first LF message did not arrive"
wait_for_subject "bare lf two" 30 >/dev/null || fail "the second LF message did not arrive"
n=$(grep -c 'end of DATA with a bare LF accepted' "$T/relayd.log" || true)
[ "$n" = 1 ] || fail "the bare-LF end of DATA was logged $n times in one session (want 1)"

say "2: normalize: a message smuggled behind \\n.\\n stays text of the first"
before=$(maildir_count)
{ smtp_prelude "EHLO app" app@lan.test; cat <<'S'; } | smtp_dialogue --port "$PN" || \
    fail "normalize let a bare-LF dot end the message"
>raw Subject: smuggle carrier\r\n\r\nbefore\n.\nMAIL FROM:<evil@example.net>\r\nRCPT TO:<user@example.com>\r\nDATA\r\nSubject: smuggled\r\n\r\nhidden\r\n.\r\n
< 250
> QUIT
< 221
S
f=$(wait_for_subject "smuggle carrier" 30) || fail "the carrier message did not arrive"
grep -q 'MAIL FROM:<evil@example.net>' "$f" || fail "the smuggled commands are not text of the carrier"
sleep 1
[ "$(maildir_count)" = $((before + 1)) ] || fail "a smuggled second message was delivered"

say "3: reject: 550 5.5.2 and a refusal line"
{ smtp_prelude "HELO app" app@lan.test; cat <<'S'; } | smtp_dialogue --port "$PR" || \
    fail "bare_lf = reject did not refuse"
>raw Subject: refused\r\n\r\nbare\n.\r\n
< 550 5.5.2 Error: bare <LF> received
eof 5
S
grep -qE 'reason=bare_lf: .*setting: bare_lf' "$T/relayd.log" || fail "no refusal line naming bare_lf"

say "4: reject listener, client in bare_lf_accept: LF.LF accepted"
smtp_dialogue --port "$PR" --source 127.0.0.2 <<'S' || fail "bare_lf_accept did not exempt 127.0.0.2"
< 220
>lf HELO panel
< 250
>lf MAIL FROM:<panel@lan.test>
< 250
>lf RCPT TO:<user@example.com>
< 250
>lf DATA
< 354
>raw Subject: exempt lf\n\nALARM 3\n.\n
< 250
>lf QUIT
< 221
S
wait_for_subject "exempt lf" 30 >/dev/null || fail "the exempt client's message did not arrive"
check_relayd_exit
pass
