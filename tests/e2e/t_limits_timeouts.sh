#!/usr/bin/env bash
# t_limits_timeouts: command_timeout and data_timeout are honoured separately: an idle
# client gets "421 4.4.2" after the configured seconds (not before) and is disconnected;
# a message abandoned in DATA leaves nothing in the spool.
source "$(dirname "$0")/lib.sh"

write_relayd_conf "$T/relayd.conf"
relayd_conf "$T/relayd.conf" "listener lan" "command_timeout = 2s
data_timeout = 4s"
start_relayd "$T/relayd.conf"

say "1: idle after EHLO: 421 4.4.2 after about 2 s"
start=$(date +%s.%N)
smtp_dialogue --timeout 8 <<'S' || fail "command timeout dialogue failed"
< 220
> EHLO idle
< 250
<~ ^421 4\.4\.2
eof 3
S
took=$(python3 -c "import time,sys; print(round(time.time() - float(sys.argv[1]), 1))" "$start")
say "   421 after ${took}s"
python3 -c "import sys; t=float(sys.argv[1]); sys.exit(0 if 1.5 <= t <= 5.5 else 1)" "$took" ||
    fail "command timeout took ${took}s, want about 2s"

say "2: idle in DATA: no 421 at the command timeout, 421 4.4.2 at the data timeout"
start=$(date +%s.%N)
smtp_dialogue --timeout 8 <<'S' || fail "data timeout dialogue failed"
< 220
> EHLO slow
< 250
> MAIL FROM:<slow@example.net>
< 250
> RCPT TO:<user@example.com>
< 250
> DATA
< 354
> Subject: never finished
>
> first line
noeof 2.8
<~ ^421 4\.4\.2
eof 3
S
took=$(python3 -c "import time,sys; print(round(time.time() - float(sys.argv[1]), 1))" "$start")
say "   421 after ${took}s"
python3 -c "import sys; t=float(sys.argv[1]); sys.exit(0 if 3.5 <= t <= 7.5 else 1)" "$took" ||
    fail "data timeout took ${took}s, want about 4s"
sleep 0.5
[ "$(spool_count)" -eq 0 ] || fail "a timed-out DATA left a message in the spool"
grep -qE 'timeout' "$T/relayd.log" || fail "relayd did not log the timeouts"
pass
