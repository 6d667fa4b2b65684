#!/usr/bin/env bash
# t_out_failover_rcpt (issue #9, defect 2): failover re-offers only the recipients that no
# upstream accepted.  The primary refuses a@ as the relay's own fault (553 not owned by
# user) and accepts b@; the failover upstream gets a@ alone, and b@ arrives exactly once.
source "$(dirname "$0")/lib.sh"

P1=$(free_port)
P2=$(free_port)
start_fake_upstream "$P1" "$T/primary" \
    --rcpt-reply 'a@example.com=553 5.7.1 <a@example.com>: Sender address rejected: not owned by user dev'
start_fake_upstream "$P2" "$T/backup"
write_fake_relayd_conf "$T/relayd.conf" "$P1"
relayd_conf "$T/relayd.conf" "upstream backup" "host = 127.0.0.1" "port = $P2" "tls = none" \
    "connect_timeout = 5s" "command_timeout = 10s"
relayd_conf "$T/relayd.conf" "route default" "failover = backup"
start_relayd "$T/relayd.conf"

make_message "$T/m.eml" "failover per recipient"
relay_send "$T/m.eml" a@example.com,b@example.com || fail "relayd did not accept the message"
wait_for_queue_empty 20 || { queue_json >&2; fail "the message did not leave the spool"; }
sleep 2
b_primary=$(cat "$T"/primary/msg-*.env 2>/dev/null | grep -c '^to b@example.com$' || true)
b_backup=$(cat "$T"/backup/msg-*.env 2>/dev/null | grep -c '^to b@example.com$' || true)
a_backup=$(cat "$T"/backup/msg-*.env 2>/dev/null | grep -c '^to a@example.com$' || true)
say "   b@ at primary: $b_primary, b@ at backup: $b_backup, a@ at backup: $a_backup"
[ "$b_primary" -eq 1 ] || fail "b@ reached the primary $b_primary times, want 1"
[ "$b_backup" -eq 0 ] || fail "b@ was sent again through the failover"
[ "$a_backup" -eq 1 ] || fail "a@ did not go through the failover"
grep -q 'trying failover upstream backup for 1 recipient' "$T/relayd.log" || fail "no failover line for one recipient"
grep -E 'to=<a@example.com> relay=backup.*status=sent' "$T/relayd.log" > /dev/null || fail "a@ not logged as sent through backup"
[ "$(grep -c 'to=<b@example.com> .*status=' "$T/relayd.log")" -eq 1 ] || fail "b@ has more than one outcome line"
check_relayd_exit
pass
