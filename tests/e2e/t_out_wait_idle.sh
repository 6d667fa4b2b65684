#!/usr/bin/env bash
# t_out_wait_idle (issue #9, defect 9): mail held behind a wrong password costs nothing
# while it waits: once the upstream is unhealthy (and the device history of the sending
# sessions is flushed) the spool is not written at all (its file does not change), nothing is bounced, and after SIGHUP with the right password every
# message is delivered.  (The figures for 100,000 messages: contrib/bench-outage.sh.)
source "$(dirname "$0")/lib.sh"

N=30
start_postfix_upstream
use_wrong_password
write_relayd_conf "$T/relayd.conf"
start_relayd "$T/relayd.conf"

make_message "$T/m.eml" "wait idle"
for ((i = 0; i < N; i++)); do
    relay_send "$T/m.eml" "user@example.com" > /dev/null || fail "relayd did not accept message $i"
done
log_wait 'upstream provider: unhealthy' 20 || fail "the upstream was not marked unhealthy"
[ "$(grep -c 'upstream provider: unhealthy' "$T/relayd.log")" -eq 1 ] || fail "unhealthy logged more than once"
# The writes of the rounds in flight when AUTH failed, and the device history of the
# sessions above (written with the next commit, or alone within SPOOL_DEVICES_FLUSH = 5 s).
sleep 7
sum1=$(sha256sum "$T/spool/data.mdb" | cut -d' ' -f1)
sleep 8 # four times retry_max: a waiting message rewritten per retry would show
sum2=$(sha256sum "$T/spool/data.mdb" | cut -d' ' -f1)
[ "$sum1" = "$sum2" ] || fail "the spool was written while every message only waited"
[ "$(relayctl stats --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["messages"])')" -eq "$N" ] ||
    fail "want $N messages waiting"
grep -q 'non-delivery notification' "$T/relayd.log" && fail "a waiting message was bounced"

say "   right password, SIGHUP"
(umask 077; printf '%s\n' "$SASL_PASSWORD" > "$RELAYD_PWFILE")
kill -HUP "$RELAYD_PID"
wait_for_maildir_count "$N" 60 || fail "only $(maildir_count) of $N delivered after the reload"
wait_for_queue_empty 10 || fail "queue not empty"
check_relayd_exit
pass
