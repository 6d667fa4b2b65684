#!/usr/bin/env bash
# t_out_routing: two real upstreams (two Postfix submission services, told apart by the
# host name in their Received: header); routes by recipient domain, by sender and by client
# address pick the second one, everything else takes the default; a message with
# recipients on both routes is split, one copy per upstream.
source "$(dirname "$0")/lib.sh"

make_ca
PF_DIR=$T/postfix
PF_PORT=$(free_port)
P2=$(free_port)
PF_EXTRA_MASTER=$(pf_service "$P2" second myhostname=upstream2.test)
PF_EXTRA_PORTS=$P2
start_postfix_upstream
write_relayd_conf "$T/relayd.conf"
relayd_conf "$T/relayd.conf" "upstream second" "host = localhost
port = $P2
ca_file = $T/ca/ca.pem
username = $SASL_LOGIN
password_file = $T/provider.secret
connect_timeout = 5s"
relayd_conf "$T/relayd.conf" "route to-net" "upstream = second
recipient_domain = example.net"
relayd_conf "$T/relayd.conf" "route from-special" "upstream = second
sender = special@lan.test"
relayd_conf "$T/relayd.conf" "route from-second-ip" "upstream = second
client = 127.0.0.2/32"
start_relayd "$T/relayd.conf"

# upstream_of FILE: which upstream handed FILE to the Maildir.
upstream_of() {
    if grep -qE '^[[:space:]]+by upstream2\.test \(Postfix\)' "$1"; then
        echo second
    elif grep -qE '^[[:space:]]+by upstream\.test \(Postfix\)' "$1"; then
        echo provider
    else
        echo unknown
    fi
}

make_message "$T/rcpt.eml" "route by recipient"
relay_send "$T/rcpt.eml" user@example.net || fail "not accepted: route by recipient"
make_message "$T/sender.eml" "route by sender"
send_swaks "$RELAYD_PORT" --from special@lan.test --to user@example.com --data "@$T/sender.eml" ||
    fail "not accepted: route by sender"
make_message "$T/client.eml" "route by client"
relay_send "$T/client.eml" user@example.com --local-interface 127.0.0.2 ||
    fail "not accepted: route by client (from 127.0.0.2)"
make_message "$T/default.eml" "route default"
relay_send "$T/default.eml" user@example.com || fail "not accepted: route default"
make_message "$T/split.eml" "route split"
relay_send "$T/split.eml" user@example.com,other@example.net || fail "not accepted: route split"

wait_for_maildir_count 6 30 || { queue_json >&2 || true; fail "only $(maildir_count) of 6 arrived"; }
sleep 1
[ "$(maildir_count)" -eq 6 ] || fail "$(maildir_count) messages arrived, want exactly 6"

check() {
    local subject=$1 want=$2 f got
    f=$(maildir_find "$subject") || fail "'$subject' did not arrive"
    got=$(upstream_of "$f")
    say "   '$subject' came through $got"
    [ "$got" = "$want" ] || fail "'$subject' came through $got, want $want"
    assert_body "$f" "$T/$3.eml.body"
}
check "route by recipient" second rcpt
check "route by sender" second sender
check "route by client" second client
check "route default" provider default

# The split message: one copy per upstream, each with its own recipient.
n=0
for f in $(maildir_files); do
    grep -qFx "Subject: route split" "$f" || continue
    n=$((n + 1))
    case $(upstream_of "$f") in
        second) grep -q 'other@example.net' "$f" || fail "split: second upstream's copy is not for other@" ;;
        provider) grep -q 'user@example.com' "$f" || fail "split: provider's copy is not for user@" ;;
        *) fail "split: a copy from an unknown upstream" ;;
    esac
done
[ "$n" -eq 2 ] || fail "split: $n copies, want 2 (one per route)"
grep -qE 'to=<other@example.net> relay=second\[' "$T/relayd.log" ||
    fail "relayd's log has no delivery of other@example.net through upstream second"
grep -qE 'to=<user@example.com> relay=provider\[' "$T/relayd.log" ||
    fail "relayd's log has no delivery of user@example.com through upstream provider"
wait_for_queue_empty 10 || fail "queue not empty"
pass
