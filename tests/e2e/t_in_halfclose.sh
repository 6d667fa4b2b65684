#!/usr/bin/env bash
# t_in_halfclose: a client that half-closes (shutdown of its sending side) right after the
# final dot still gets its 250 once the commit is durable (before: dropped before the
# 250, so it would send the message again: a duplicate); with QUIT pipelined before the
# half-close it gets 250 and 221.  Both messages are in the spool exactly once.
source "$(dirname "$0")/lib.sh"

write_relayd_conf "$T/relayd.conf"
start_relayd "$T/relayd.conf"

say "1: final dot, then shutdown(SHUT_WR): the 250 still arrives"
{ smtp_prelude "HELO device" device@lan.test; cat <<'S'; } | smtp_dialogue || \
    fail "no 250 after a half-close behind the final dot"
>raw Subject: half close\r\n\r\nbody\r\n.\r\n
shut
< 250
eof 5
S

say "2: final dot and QUIT, then shutdown: 250 and 221"
{ smtp_prelude "HELO device" device@lan.test; cat <<'S'; } | smtp_dialogue || \
    fail "no 250/221 after a half-close behind QUIT"
>raw Subject: half close quit\r\n\r\nbody\r\n.\r\nQUIT\r\n
shut
< 250
< 221
eof 5
S
n=$(grep -c ': from=<device@lan.test>' "$T/relayd.log" || true)
[ "$n" = 2 ] || fail "$n messages logged (want 2)"
check_relayd_exit
pass
