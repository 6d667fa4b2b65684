#!/usr/bin/env bash
# t_in_diag: every refusal is explained in relayd's own log, secrets never are.
# (1) an alarm panel sending AUTH LOGIN without TLS gets 538, and one info line names the
# client, the listener and auth_plaintext; the disconnect line counts its commands
# ("ehlo=1 auth=0/1 quit=1 unknown=0/3 commands=2/6"); (2) a fax asking for CRAM-MD5 where it is not
# offered: a line naming auth_mechanisms; (3) with debug_peers, "AUTH<TAB>PLAIN <b64>" and
# the lines a device pipelines behind a refused AUTH are masked; (4) accept-any: Received:
# says ESMTP, not ESMTPA (nothing was verified); (5) allow = 0.0.0.0/0 on a non-loopback
# listener is warned about at load.
source "$(dirname "$0")/lib.sh"

write_relayd_conf "$T/relayd.conf"
PF=$(free_port)
PA=$(free_port)
relayd_conf "$T/relayd.conf" "listener lan" "tls = starttls
cert = $T/ca/server.pem
key = $T/ca/server.key
auth = accept-any
debug_peers = 127.0.0.0/8"
relayd_conf "$T/relayd.conf" "listener fax" "listen = 127.0.0.1:$PF" \
    "allow = 127.0.0.0/8" \
    "auth = accept-any" \
    "auth_mechanisms = PLAIN LOGIN" \
    "auth_plaintext = yes"
relayd_conf "$T/relayd.conf" "listener any" "listen = 127.0.0.1:$PA" \
    "allow = 127.0.0.0/8" \
    "auth = accept-any" \
    "auth_plaintext = yes"
start_relayd "$T/relayd.conf"

say "1: AUTH LOGIN without TLS: 538, one line naming auth_plaintext, a summary line"
smtp_dialogue <<'S' || fail "dialogue 1 failed"
< 220
> EHLO alarm-panel
< 250
>raw AUTH LOGIN\r\nYWxhcm0tdXNlcg==\r\nc2VjcmV0LXBhbmVsLXB3\r\nplain-typed-secret\r\n
< 538
<* 3 5
> QUIT
< 221
S
log_wait 'reject: session=[0-9]+ client=127\.0\.0\.1 listener=lan helo=alarm-panel reason=auth_needs_tls: .*setting: auth_plaintext' 5 ||
    fail "no refusal line naming auth_plaintext"
log_wait 'disconnect from 127\.0\.0\.1 session=[0-9]+ ehlo=1 auth=0/1 quit=1 unknown=0/3 commands=2/6 \(quit\)' 5 ||
    fail "no Postfix-style summary line"
for secret in YWxhcm0tdXNlcg== c2VjcmV0LXBhbmVsLXB3 plain-typed-secret; do
    grep -qF -- "$secret" "$T/relayd.log" && fail "$secret (pipelined after a refused AUTH) was logged"
done

say "2: CRAM-MD5 not offered: a line naming auth_mechanisms"
smtp_dialogue --port "$PF" <<'S' || fail "dialogue 2 failed"
< 220
> EHLO fax
< 250
> AUTH CRAM-MD5
< 504
> QUIT
< 221
S
log_wait 'listener=fax helo=fax reason=auth_mechanism: AUTH CRAM-MD5: not offered.*setting: auth_mechanisms' 5 ||
    fail "no refusal line naming auth_mechanisms"

say "3: AUTH<TAB>PLAIN with an initial response is masked in the trace"
smtp_dialogue <<'S' || fail "dialogue 3 failed"
< 220
> EHLO tabby
< 250
>raw AUTH\tPLAIN AHRhYnVzZXIAdGFiLXNlY3JldA==\r\n
< 538
> QUIT
< 221
S
grep -qF 'AHRhYnVzZXIAdGFiLXNlY3JldA==' "$T/relayd.log" && fail "AUTH<TAB>PLAIN data was logged"
grep -qE 'session=[0-9]+: < AUTH PLAIN \*\*\*\*' "$T/relayd.log" || fail "the masked AUTH line is missing"

say "4: accept-any: Received: says ESMTP, not ESMTPA"
smtp_dialogue --port "$PA" <<'S' || fail "dialogue 4 failed"
< 220
> EHLO printer
< 250
> AUTH PLAIN AGFueW9uZQBhbnl0aGluZw==
< 235
> MAIL FROM:<printer@lan.test>
< 250
> RCPT TO:<user@example.com>
< 250
> DATA
< 354
> Subject: accept any
>
> body
> .
< 250
> QUIT
< 221
S
id=$(queue_ids | head -n 1)
[ -n "$id" ] || fail "the accept-any message is not in the spool"
relayctl show "$id" > "$T/show.out" 2>&1 || fail "relayctl show failed"
grep -qE 'with ESMTP id' "$T/show.out" || { cat "$T/show.out" >&2; fail "Received: does not say ESMTP"; }
grep -qE 'ESMTPS?A' "$T/show.out" && fail "Received: claims an authenticated (ESMTPA) submission"

say "5: allow = 0.0.0.0/0 on a non-loopback listener: a warning at load"
cat > "$T/open.conf" <<EOF2
[relayd]
spool = $T/spool-open
[listener world]
listen = 0.0.0.0:2525
allow = 0.0.0.0/0
EOF2
"$RELAYD_BIN" -c "$T/open.conf" --check > "$T/check.out" 2>&1 || fail "--check refused the file"
grep -qE 'allow: a /0 network' "$T/check.out" || { cat "$T/check.out" >&2; fail "no warning for allow = 0.0.0.0/0"; }
check_relayd_exit
pass
