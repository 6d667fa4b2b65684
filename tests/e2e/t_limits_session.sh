#!/usr/bin/env bash
# t_limits_session: per-session limits.  An over-long command line gets 500 5.5.2 and the
# session goes on; a message over max_message_size gets 552 5.3.4 (announced by SIZE= or
# found while reading) and nothing is spooled; recipient max_recipients + 1 gets 452 4.5.3;
# the max_errors-th bad command ends the session with 421; a client that disconnects in
# the middle of DATA leaves nothing in the spool.
source "$(dirname "$0")/lib.sh"

write_relayd_conf "$T/relayd.conf"
relayd_conf "$T/relayd.conf" "relayd" "max_message_size = 10k
max_recipients = 3"
relayd_conf "$T/relayd.conf" "listener lan" "max_line_length = 600
max_errors = 4"
start_relayd "$T/relayd.conf"

say "1: a command line over max_line_length: 500 5.5.2, then the session still works"
long=$(printf 'a%.0s' {1..700})
smtp_dialogue <<S || fail "line length dialogue failed"
< 220
> EHLO longline
< 250
>big 800 A
<~ ^500 5\.5\.2
> NOOP
< 250
> MAIL FROM:<$long@example.net>
<~ ^500 5\.5\.2
> MAIL FROM:<short@example.net>
< 250
> RSET
< 250
> QUIT
< 221
S

say "2: SIZE= over the limit: 552 5.3.4 at MAIL"
smtp_dialogue <<'S' || fail "SIZE= dialogue failed"
< 220
> EHLO big
<~ ^250[- ]SIZE 10240$
> MAIL FROM:<big@example.net> SIZE=20000
<~ ^552 5\.3\.4
> QUIT
< 221
S

say "3: a message over the limit without SIZE=: 552 5.3.4 after the dot, nothing spooled"
python3 - "$T/big.eml" <<'PY'
import sys
with open(sys.argv[1], "wb") as f:
    f.write(b"Subject: too big\r\n\r\n")
    for i in range(400):
        f.write(b"%04d " % i + b"y" * 60 + b"\r\n")
    f.write(b".\r\n")
PY
smtp_dialogue <<S || fail "oversized DATA dialogue failed"
< 220
> EHLO big
< 250
> MAIL FROM:<big@example.net>
< 250
> RCPT TO:<user@example.com>
< 250
> DATA
< 354
>file $T/big.eml
<~ ^552 5\.3\.4
> RSET
< 250
> QUIT
< 221
S
sleep 0.5
[ "$(spool_count)" -eq 0 ] || fail "an oversized message was spooled"

say "4: recipient 4 of max_recipients = 3: 452 4.5.3; the 3 are kept"
smtp_dialogue <<'S' || fail "recipients dialogue failed"
< 220
> EHLO many
< 250
> MAIL FROM:<many@example.net>
< 250
> RCPT TO:<a@example.com>
< 250
> RCPT TO:<b@example.com>
< 250
> RCPT TO:<c@example.com>
< 250
> RCPT TO:<d@example.com>
<~ ^452 4\.5\.3
> DATA
< 354
> Subject: three recipients
>
> x
> .
< 250
> QUIT
< 221
S
id=
for ((i = 0; i < 40; i++)); do
    id=$(queue_ids 2>/dev/null | head -n 1) || true
    [ -n "$id" ] && break
    sleep 0.25
done
[ -n "$id" ] || fail "the three-recipient message is not in the queue"
relayctl show "$id" > "$T/show.txt" || fail "relayctl show failed"
grep -q 'c@example.com' "$T/show.txt" || fail "recipient 3 missing"
grep -q 'd@example.com' "$T/show.txt" && fail "recipient 4 was kept"

say "5: max_errors = 4: bad commands end the session with 421"
smtp_dialogue <<'S' || fail "max_errors dialogue failed"
< 220
> EHLO bad
< 250
> XYZZY 1
< 5
> XYZZY 2
< 5
> XYZZY 3
< 5
>raw XYZZY 4\r\nXYZZY 5\r\n
<until 421
eof 5
S

say "6: disconnect in the middle of DATA: nothing spooled"
before=$(spool_count)
smtp_dialogue <<'S' || fail "mid-DATA dialogue failed"
< 220
> EHLO gone
< 250
> MAIL FROM:<gone@example.net>
< 250
> RCPT TO:<user@example.com>
< 250
> DATA
< 354
> Subject: half a message
>
> first half
close
S
log_wait 'lost connection|disconnect' 5 || true
sleep 0.5
[ "$(spool_count)" -eq "$before" ] || fail "a message cut off in DATA was spooled"
pass
