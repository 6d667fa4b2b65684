#!/usr/bin/env bash
# t_relayctl: the operator CLI against a live relayd whose upstream is Postfix's smtp-sink
# (plain SMTP, no AUTH), restarted in three moods: rejecting recipients for good (550),
# for now (450), then accepting.  Covers list (human, --json, every filter), show (every
# attempt with the server's reply), cat (byte-identical body), hold/release, retry (the
# running daemon delivers within seconds), delete, purge --failed, stats --by-client, the
# exit codes, and read-only use by an unprivileged user.
source "$(dirname "$0")/lib.sh"

SINK_PORT=$(free_port)
RELAYD_PORT=$(free_port)
SINK_PID=
mkdir -p "$T/spool" "$T/sink"
chown nobody "$T/sink"
cat > "$T/relayd.conf" <<EOF
[relayd]
hostname = relay.test
spool = $T/spool
retry_first = 60s
retry_max = 120s

[listener lan]
listen = 127.0.0.1:$RELAYD_PORT
allow = 127.0.0.0/8

[upstream sink]
host = 127.0.0.1
port = $SINK_PORT
tls = none
connect_timeout = 5s
command_timeout = 10s

[route default]
upstream = sink
EOF

# sink [smtp-sink options]: (re)starts the upstream on SINK_PORT.
sink() {
    if [ -n "$SINK_PID" ]; then
        stop_pid "$SINK_PID" 5
        wait_for_port_closed "$SINK_PORT" 5 || fail "old smtp-sink still listening"
    fi
    smtp-sink -u nobody -d "$T/sink/%M." "$@" "127.0.0.1:$SINK_PORT" 20 > "$T/sink.log" 2>&1 &
    SINK_PID=$!
    E2E_PIDS+=("$SINK_PID")
    wait_for_port "$SINK_PORT" 10 || fail "smtp-sink did not start"
}

# expect_rc WANT CMD...: runs relayctl, fails unless its exit status is WANT.
expect_rc() {
    local want=$1 rc=0
    shift
    relayctl "$@" > "$T/out" 2> "$T/err" < /dev/null || rc=$?
    [ "$rc" -eq "$want" ] || fail "relayctl $*: exit $rc, want $want ($(cat "$T/err"))"
}

# ids_of JSON-FILE: the ids in a list --json document, space separated.
ids_of() { python3 -c 'import json,sys; print(" ".join(m["id"] for m in json.load(open(sys.argv[1]))))' "$1"; }

# send FROM TO SUBJECT: one message through relayd; its queue id on stdout.
send() {
    make_message "$T/$3.eml" "$3"
    send_swaks "$RELAYD_PORT" --from "$1" --to "$2" --data "@$T/$3.eml" ||
        fail "relayd refused $3"
    grep -oE 'queued as [0-9A-F]+' "$T/swaks.log" | tail -n 1 | awk '{print $3}'
}

start_relayd "$T/relayd.conf"

say "1: a permanent reject (550) and temporary ones (450) from the upstream"
sink -f RCPT -B "550 5.1.1 <bad@example.com>: Recipient address rejected: User unknown"
# From <>: a failed message with a sender would also produce a bounce.
F=$(send '<>' bad@example.com failing)
wait_for_queue_state failed 15 > /dev/null || fail "550 did not fail the message"
sink -r RCPT -b "450 4.2.0 <x>: Recipient address rejected: Mailbox busy"
D1=$(send scanner@lan.test alice@example.com first)
D2=$(send printer@Lan.Test bob@example.net second)
D3=$(send scanner@lan.test carol@example.com third)
for ((i = 0; i < 40; i++)); do
    [ "$(relayctl list --json --state deferred | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')" -eq 3 ] && break
    sleep 0.25
done
[ "$i" -lt 40 ] || { relayctl list >&2; fail "three messages not deferred"; }
say "   failed $F, deferred $D1 $D2 $D3"

say "2: list, human and JSON, with filters"
expect_rc 0 list
head -n 1 "$T/out" | grep -q '^ID .*STATE .*CLIENT .*SENDER' || fail "list header: $(head -n 1 "$T/out")"
[ "$(grep -c . "$T/out")" -eq 5 ] || fail "list shows $(($(grep -c . "$T/out") - 1)) messages, want 4"
check_list() { # WANT-IDS ARGS...
    local want=$1 got
    shift
    relayctl list --json "$@" > "$T/l.json" || fail "list --json $* failed"
    got=$(ids_of "$T/l.json")
    [ "$got" = "$want" ] || fail "list $*: got '$got', want '$want'"
}
check_list "$F $D1 $D2 $D3"
check_list "$F" --state failed
check_list "$D1 $D2 $D3" --state=deferred
check_list "$D1 $D3" --from scanner@LAN.test
check_list "$D2" --from lan.test --to example.net
check_list "$D1" --to ALICE
check_list "" --to nobody@nowhere
check_list "$F $D1 $D2 $D3" --client 127.0.0.1
check_list "$F $D1 $D2 $D3" --client 127.0.0.0/8
check_list "" --client 10.0.0.0/8
check_list "" --older-than 1h
sleep 1.1
check_list "$F $D1 $D2 $D3" --older-than 0s
check_list "$F" --from '<>'
expect_rc 2 list --state bogus
expect_rc 2 list --client 10.0.0.0/33
expect_rc 2 list --older-than soon
expect_rc 2 list --to

say "3: show: every attempt with the server's reply; cat: the body as sent"
expect_rc 0 show "$F"
grep -q '550 5.1.1' "$T/out" || { cat "$T/out" >&2; fail "show $F lacks the 550 reply"; }
grep -q '^state: *failed' "$T/out" || fail "show $F: not failed"
expect_rc 0 show "$D1" --json
python3 - "$T/out" <<'PY' || fail "show --json $D1: $(cat "$T/out")"
import json, sys
m = json.load(open(sys.argv[1]))
assert m["state"] == "deferred" and m["attempts"] >= 1, m
assert any("450 4.2.0" in (h["result"] or "") for h in m["history"]), m["history"]
assert "450 4.2.0" in (m["rcpts"][0]["reply"] or ""), m["rcpts"]
assert "Subject: first" in m["headers"], m["headers"]
PY
expect_rc 0 cat "$D1"
body_of "$T/out" > "$T/cat.body"
cmp -s "$T/first.eml.body" "$T/cat.body" || fail "cat $D1: body differs from what was sent"

say "4: stats, also per device"
expect_rc 0 stats
grep -qE '^messages: +4' "$T/out" || fail "stats: $(cat "$T/out")"
expect_rc 0 stats --by-client
grep -qE '^127\.0\.0\.1 +4 ' "$T/out" || fail "stats --by-client: $(cat "$T/out")"
expect_rc 0 stats --json --by-client
python3 - "$T/out" <<'PY' || fail "stats --json --by-client: $(cat "$T/out")"
import json, sys
st = json.load(open(sys.argv[1]))
assert st["messages"] == 4 and st["failed"] == 1 and st["deferred"] == 3, st
assert st["oldest_age"] >= 1, st
bc = st["by_client"]
assert len(bc) == 1 and bc[0]["client"] == "127.0.0.1" and bc[0]["messages"] == 4, bc
PY

say "5: hold and release"
expect_rc 0 hold "$D1"
check_list "$D1" --state held
expect_rc 1 release "$D2"   # not held
expect_rc 0 release "$D1"
[ "$(queue_field "$D1" state)" != held ] || fail "release left $D1 held"

say "6: retry: the running relayd delivers within seconds"
for ((i = 0; i < 20; i++)); do
    [ "$(queue_field "$D1" state)" = deferred ] && break   # the release's attempt is done
    sleep 0.25
done
[ "$(queue_field "$D1" state)" = deferred ] || fail "released $D1 not attempted again"
sink
expect_rc 0 retry "$D1"
t0=$SECONDS
for ((i = 0; i < 20; i++)); do
    [ -z "$(queue_field "$D1" state)" ] && break
    sleep 0.25
done
[ -z "$(queue_field "$D1" state)" ] || fail "retried $D1 not delivered within 5s"
say "   $D1 delivered $((SECONDS - t0))s after retry"
[ "$(queue_field "$D2" state)" = deferred ] || fail "$D2 left deferred without being retried"

say "7: delete asks unless --yes"
expect_rc 2 delete "$D3"
[ "$(queue_field "$D3" state)" = deferred ] || fail "delete without --yes deleted"
expect_rc 0 delete --yes "$D3"
[ -z "$(queue_field "$D3" state)" ] || fail "$D3 still listed after delete"
expect_rc 1 delete --yes "$D3"
grep -q 'no such message' "$T/err" || fail "second delete: $(cat "$T/err")"

say "8: purge --failed"
expect_rc 2 purge
expect_rc 2 purge --failed
expect_rc 0 purge --failed --older-than 1d --yes
grep -q '^0 failed messages deleted' "$T/out" || fail "purge --older-than 1d: $(cat "$T/out")"
expect_rc 0 purge --failed --yes
grep -q '^1 failed message deleted' "$T/out" || fail "purge: $(cat "$T/out")"
[ -z "$(queue_field "$F" state)" ] || fail "$F survived the purge"

say "9: retry --all"
expect_rc 0 retry --all
wait_for_queue_empty 10 || fail "retry --all did not deliver $D2"
[ "$(ls "$T"/sink | wc -l)" -ge 2 ] || fail "smtp-sink captured $(ls "$T"/sink | wc -l) messages, want 2"

say "10: exit codes"
expect_rc 1 show 0000DEADBEEF
grep -q 'show 0000DEADBEEF: no such message' "$T/err" || fail "unknown id: $(cat "$T/err")"
expect_rc 1 cat 0000DEADBEEF
expect_rc 2 show not-an-id
expect_rc 2 show
expect_rc 2 frobnicate
expect_rc 2 retry
expect_rc 2 retry --all "$D2"
expect_rc 0 --help
rc=0; "$RELAYCTL_BIN" --spool "$T/no-such-spool" list > /dev/null 2>&1 || rc=$?
[ "$rc" -eq 1 ] || fail "missing spool: exit $rc, want 1"

say "11: read-only use by an unprivileged user"
stop_pid "$SINK_PID" 5   # upstream down: the next message stays
SINK_PID=
D4=$(send scanner@lan.test dave@example.com fourth)
expect_rc 0 hold "$D4"
chmod 0755 "$T/spool"
chmod 0644 "$T/spool/data.mdb"
ro() { runuser -u nobody -- "$RELAYCTL_BIN" --spool "$T/spool" "$@"; }
# LMDB's reader table lives in lock.mdb: with write access to it, reads are locked as usual.
chmod 0666 "$T/spool/lock.mdb"
ro list --json > "$T/ro.json" 2> "$T/ro.err" || fail "list as nobody: $(cat "$T/ro.err")"
[ "$(ids_of "$T/ro.json")" = "$D4" ] || fail "list as nobody: $(cat "$T/ro.json")"
ro show "$D4" > /dev/null 2>&1 || fail "show as nobody failed"
rc=0; ro hold "$D4" > /dev/null 2> "$T/ro.err" || rc=$?
[ "$rc" -eq 1 ] || fail "hold as nobody: exit $rc, want 1 (read-only)"
# Without it relayctl still reads (unlocked, checked against concurrent commits).
chmod 0644 "$T/spool/lock.mdb"
ro list --json > "$T/ro.json" 2> "$T/ro.err" || fail "list as nobody, lock.mdb read-only: $(cat "$T/ro.err")"
[ "$(ids_of "$T/ro.json")" = "$D4" ] || fail "unlocked list as nobody: $(cat "$T/ro.json")"
ro stats > /dev/null 2>&1 || fail "stats as nobody, lock.mdb read-only"
chmod 0600 "$T/spool/lock.mdb" "$T/spool/data.mdb"
chmod 0700 "$T/spool"
expect_rc 0 delete --yes "$D4"
pass
