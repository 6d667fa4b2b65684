#!/usr/bin/env bash
# t_multi_haproxy (issue #11 item 7): two relayd behind Debian's HAProxy, configured from
# contrib/haproxy.cfg (PROXY v2, smtpchk health checks).  The device's address reaches
# relayd through PROXY v2; under load one relayd is killed with SIGKILL and restarted on
# its spool, and every message acknowledged with 250 is delivered (duplicates only from the
# final-dot window, reported); `relayctl drain` takes a node out of HAProxy (its greeting
# is 421) while mail flows through the other, and `relayctl resume` brings it back.
source "$(dirname "$0")/lib.sh"

command -v haproxy > /dev/null || fail "haproxy is not installed (contrib/setup.sh)"
HP=$(free_port)
UP=$(free_port)
R1=$(free_port)
R2=$(free_port)
start_fake_upstream "$UP" "$T/up"

# Two nodes, each with its own spool, each taking PROXY v2 from HAProxy (127.0.0.1).
RELAYD_PORT=$R1 RELAYD_RETRY_FIRST=1 RELAYD_RETRY_MAX=2 write_fake_relayd_conf "$T/r1.conf" "$UP"
relayd_conf "$T/r1.conf" "listener lan" "proxy_protocol = v2" "proxy_trusted = 127.0.0.1/32"
[ "$(id -u)" = 0 ] && relayd_conf "$T/r1.conf" relayd "run_as_root = yes" # files under $T
sed "s|^spool = .*|spool = $T/spool2|; s|^listen = 127.0.0.1:$R1|listen = 127.0.0.1:$R2|" \
    "$T/r1.conf" > "$T/r2.conf"
relayd_conf "$T/r1.conf" relayd "spool = $T/spool1"
mkdir -p "$T/spool1" "$T/spool2"
declare -A NODE_PID NODE_PORT=([1]=$R1 [2]=$R2)

start_node() {
    [ -f "$T/relayd$1.log" ] && cat "$T/relayd$1.log" >> "$T/relayd$1.log.old"
    "$RELAYD_BIN" -c "$T/r$1.conf" > "$T/relayd$1.log" 2>&1 &
    NODE_PID[$1]=$!
    wait_for_port "${NODE_PORT[$1]}" 15 || fail "relayd $1 not listening on ${NODE_PORT[$1]}"
}
node_ctl() { local n=$1; shift; "$RELAYCTL_BIN" --spool "$T/spool$n" "$@"; }
# accepted N: messages node N accepted so far (its "from=<...> size=" lines).
accepted() { cat "$T/relayd$1.log.old" "$T/relayd$1.log" 2> /dev/null | grep -c ': from=<.*> size=' || true; }
stop_node() {
    local pid=${NODE_PID[$1]} rc=0
    kill -TERM "$pid" 2> /dev/null || true
    wait_pid_gone "$pid" 15 || { kill -KILL "$pid"; fail "relayd $1 ignored SIGTERM"; }
    wait "$pid" 2> /dev/null || rc=$?
    [ "$rc" = 0 ] || [ "$rc" = 143 ] || fail "relayd $1 exited with status $rc"
    NODE_PID[$1]=
}
start_node 1
start_node 2
E2E_PIDS+=("${NODE_PID[1]}" "${NODE_PID[2]}")

# HAProxy from the shipped file: loopback ports, logs to stdout.
sed -e "s|^\( *\)log /dev/log .*|\1log stdout format raw local0 info|" \
    -e "s|bind :25 .*# test: frontend|bind 127.0.0.1:$HP|" \
    -e "s|server relay1 .*# test: relay1|server relay1 127.0.0.1:$R1|" \
    -e "s|server relay2 .*# test: relay2|server relay2 127.0.0.1:$R2|" \
    "$E2E_SRC/contrib/haproxy.cfg" > "$T/haproxy.cfg"
grep -q "127.0.0.1:$R2" "$T/haproxy.cfg" || fail "contrib/haproxy.cfg lost its test: markers"
binds=$(grep -E '^\s*bind ' "$T/haproxy.cfg" || true)
grep -qv "^\s*bind 127\.0\.0\.1:$HP\s*$" <<< "$binds" && fail "haproxy would listen beyond 127.0.0.1:$HP: $binds"
haproxy -c -f "$T/haproxy.cfg" > "$T/haproxy-check.log" 2>&1 || { cat "$T/haproxy-check.log" >&2; fail "haproxy -c refused the config"; }
haproxy -f "$T/haproxy.cfg" -db > "$T/haproxy.log" 2>&1 &
HAPROXY_PID=$!
E2E_PIDS+=("$HAPROXY_PID")
wait_for_port "$HP" 10 || fail "haproxy not listening on $HP"
# Both nodes got a health check (PROXY v2 LOCAL, EHLO haproxy.local).
for ((i = 0; i < 50; i++)); do
    grep -q 'connect from 127.0.0.1' "$T/relayd1.log" &&
        grep -q 'connect from 127.0.0.1' "$T/relayd2.log" && break
    sleep 0.2
done
say "haproxy pid $HAPROXY_PID on 127.0.0.1:$HP -> relayd 127.0.0.1:$R1, 127.0.0.1:$R2"

# 1. The device's address arrives through PROXY v2: the client binds 127.0.0.2.
smtp_dialogue --port "$HP" --source 127.0.0.2 > "$T/proxy.out" <<'S' ||
< 220
> EHLO printer.lan
< 250
> MAIL FROM:<printer@lan.test>
< 250
> RCPT TO:<user@example.com>
< 250
> DATA
< 354
> Subject: through haproxy
>
> hello
> .
< 250
> QUIT
< 221
S
    { cat "$T/proxy.out" >&2; fail "a message through haproxy was not accepted"; }
wait_for_fake_count "$T/up" 1 15 || fail "the message through haproxy was not delivered"
grep -qE '^Received: from printer\.lan \(\[127\.0\.0\.2\]\)' "$T"/up/msg-*.eml ||
    fail "relayd did not see the client address 127.0.0.2 through PROXY v2"
grep -h 'connect from 127.0.0.2' "$T/relayd1.log" "$T/relayd2.log" > /dev/null ||
    fail "no 'connect from 127.0.0.2' in either relayd's log"
say "1: the client address 127.0.0.2 arrived through PROXY v2"

# 2. Load through haproxy; relayd 2 is killed with SIGKILL and restarted on its spool.
start_load_client "$HP" multi --threads 4 --per-conn 5 --pause 0.02 --size 2000 --seconds 60
wait_acked() {
    for ((i = 0; i < 100; i++)); do [ "$(load_acked)" -ge "$1" ] && return 0; sleep 0.2; done
    return 1
}
wait_acked 40 || fail "only $(load_acked) messages acknowledged before the kill"
kill -KILL "${NODE_PID[2]}"
wait "${NODE_PID[2]}" 2> /dev/null || true
at_kill=$(load_acked)
sleep 0.5
start_node 2
E2E_PIDS+=("${NODE_PID[2]}")
wait_acked $((at_kill + 40)) || fail "only $(load_acked) messages acknowledged after the restart"
stop_load_client
total=$(load_acked)
say "2: relayd 2 killed after $at_kill acknowledged; $(cat "$T/client.out")"
[ "$(accepted 1)" -gt 5 ] && [ "$(accepted 2)" -gt 5 ] ||
    fail "haproxy did not spread the load: relayd 1 took $(accepted 1), relayd 2 $(accepted 2)"
for n in 1 2; do
    for ((i = 0; i < 100; i++)); do
        [ "$(node_ctl "$n" list --json 2> /dev/null | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')" = 0 ] && break
        sleep 0.2
    done
done
# A duplicate is possible only for a message whose final dot the upstream had answered
# when relayd 2 died, before its "delivered" record was durable: at most [relayd] workers.
check_acked_delivered "$T/acked" multi- 4 "$T/up" > "$T/verdict" ||
    { cat "$T/verdict" >&2; fail "acknowledged mail lost"; }
say "2: $(cat "$T/verdict")"

# 3. Drain relayd 1: haproxy takes it out; mail goes through relayd 2; resume brings it back.
# haproxy_says TEXT: TEXT in haproxy's log after line $mark (bounded wait of 10 s).
haproxy_says() {
    for ((i = 0; i < 50; i++)); do
        tail -n "+$((mark + 1))" "$T/haproxy.log" | grep -q "$1" && return 0
        sleep 0.2
    done
    return 1
}
mark=$(wc -l < "$T/haproxy.log")
node_ctl 1 drain > /dev/null || fail "relayctl drain failed"
haproxy_says 'relay1 is DOWN' || fail "haproxy did not mark the drained relayd down"
before1=$(accepted 1)
before2=$(accepted 2)
for i in 1 2 3 4 5; do
    make_message "$T/d$i.eml" "during drain $i"
    send_swaks "$HP" --from sender@lan.test --to user@example.com --data "@$T/d$i.eml" ||
        fail "message $i during the drain was refused"
done
[ "$(accepted 1)" = "$before1" ] || fail "the drained relayd accepted mail"
[ "$(accepted 2)" -eq $((before2 + 5)) ] || fail "relayd 2 did not take the mail during the drain"
mark=$(wc -l < "$T/haproxy.log")
node_ctl 1 resume > /dev/null || fail "relayctl resume failed"
haproxy_says 'relay1 is UP' || fail "haproxy did not bring the resumed relayd back"
say "3: drained relayd 1 left haproxy, relayd 2 took 5 messages, resume brought relayd 1 back"

# HAProxy's health checks (PROXY v2 LOCAL, every 2 s) are not devices and log no lines.
node_ctl 1 devices > "$T/devices1.out" 2>&1 || fail "relayctl devices failed"
grep -q 'haproxy.local' "$T/devices1.out" && fail "a health check was recorded as a device"
grep -q 'helo=haproxy.local' "$T"/relayd1.log* && fail "a health check was logged as a session"

kill -TERM "$HAPROXY_PID"
wait_pid_gone "$HAPROXY_PID" 10 || fail "haproxy did not stop"
stop_node 1
stop_node 2
if grep -qE 'ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:' "$T"/relayd[12].log*; then
    fail "sanitizer report in a relayd log"
fi
say "PASS"
exit 0
