#!/usr/bin/env bash
# t_in_nofile: relayd sizes itself for max_connections.  (1) listen_backlog is what the
# kernel queues (ss shows it as the listening socket's Send-Q; before: always 128); (2) with
# a low soft open-files limit relayd raises it to what max_connections needs and says so;
# (3) with a hard limit too low it says at start that connections beyond it will fail.
source "$(dirname "$0")/lib.sh"

write_relayd_conf "$T/relayd.conf"
relayd_conf "$T/relayd.conf" "relayd" "max_connections = 1000"
relayd_conf "$T/relayd.conf" "listener lan" "listen_backlog = 1000"

say "1+2: listen_backlog = 1000; soft limit 256 raised for max_connections = 1000"
ulimit -Sn 256
start_relayd "$T/relayd.conf"
q=$(ss -Hltn "sport = :$RELAYD_PORT" | awk '{ print $3 }' | head -n 1)
[ "$q" = 1000 ] || fail "the listen backlog is '$q', not 1000"
log_wait 'open files limit raised to [0-9]+ for max_connections = 1000' 5 ||
    fail "relayd did not raise its open-files limit"
stop_relayd

say "3: hard limit 512: a warning at start"
ulimit -Hn 512
start_relayd "$T/relayd.conf"
log_wait 'open files limit is 512, but max_connections = 1000 needs about [0-9]+' 5 ||
    fail "no warning about the open-files limit"
check_relayd_exit
pass
