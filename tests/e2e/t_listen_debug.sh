#!/usr/bin/env bash
# t_listen_debug: debug_peers = 127.0.0.1/32 logs the whole dialogue of that client, with
# AUTH data masked: neither the password nor its base64 forms appear in the log.  A client
# outside debug_peers (127.0.0.2) gets no transcript.
source "$(dirname "$0")/lib.sh"

PW='dbg-Pass.42'
printf '%s\n' "$PW" | saslpasswd2 -p -c -f "$T/relayd-sasldb" -u example.com dbg
write_relayd_conf "$T/relayd.conf"
relayd_conf "$T/relayd.conf" "listener lan" "debug_peers = 127.0.0.1/32
auth = optional
auth_plaintext = yes
sasldb = $T/relayd-sasldb"
start_relayd "$T/relayd.conf"

PLAIN_B64=$(printf '\0dbg@example.com\0%s' "$PW" | base64 -w0)
PW_B64=$(printf '%s' "$PW" | base64 -w0)
say "1: a debug peer authenticates with AUTH PLAIN and AUTH LOGIN"
smtp_dialogue --source 127.0.0.1 <<S || fail "debug peer dialogue failed"
< 220
> EHLO debugged-device
< 250
> AUTH PLAIN $PLAIN_B64
< 235
> MAIL FROM:<marker-sender@example.net>
< 250
> QUIT
< 221
S
smtp_dialogue --source 127.0.0.1 <<S || fail "debug peer AUTH LOGIN dialogue failed"
< 220
> EHLO debugged-device
< 250
> AUTH LOGIN
< 334
>b64 dbg@example.com
< 334
> $PW_B64
< 235
> QUIT
< 221
S
sleep 0.5
grep -q 'debugged-device' "$T/relayd.log" || fail "the EHLO of a debug peer is not in the log"
grep -q 'marker-sender@example.net' "$T/relayd.log" || fail "the MAIL of a debug peer is not logged"
grep -qE '250[ -]' "$T/relayd.log" || fail "relayd's replies are not in the transcript"
for secret in "$PW" "$PLAIN_B64" "$PW_B64"; do
    if grep -qF -- "$secret" "$T/relayd.log"; then
        grep -nF -- "$secret" "$T/relayd.log" >&2
        fail "AUTH data ($secret) appears in the log"
    fi
done

say "2: 127.0.0.2 is not a debug peer: no transcript"
smtp_dialogue --source 127.0.0.2 <<'S' || fail "non-debug dialogue failed"
< 220
> EHLO quiet-device
< 250
> QUIT
< 221
S
sleep 0.5
grep -q 'quiet-device' "$T/relayd.log" && fail "a client outside debug_peers was transcribed"
pass
