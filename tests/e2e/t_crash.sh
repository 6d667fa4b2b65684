#!/usr/bin/env bash
# t_crash: relayd is killed with SIGKILL at random moments while clients push mail through
# it to the Postfix upstream, and restarted on the same spool each time.  At the end every
# message that got "250" after its DATA is in the upstream's Maildir at least once
# (duplicates are allowed and reported: a kill between the upstream's 250 and our durable
# "delivered" record resends), and the spool is empty: nothing is lost or left stuck.
source "$(dirname "$0")/lib.sh"

KILLS=${CRASH_KILLS:-20}
KILL_WINDOW=${CRASH_WINDOW:-35}   # seconds; stop killing early rather than overrun
THREADS=${CRASH_THREADS:-4}

RELAYD_RETRY_FIRST=1 RELAYD_RETRY_MAX=2 write_relayd_conf "$T/relayd.conf"
start_postfix_upstream
start_relayd "$T/relayd.conf"

say "clients: $THREADS sessions sending numbered messages; $KILLS kills within ${KILL_WINDOW}s"
start_load_client "$RELAYD_PORT" crash --threads "$THREADS" --per-conn 5 --pause 0.05 --size 3000 \
    --seconds 90

start=$SECONDS
kills=0
while [ "$kills" -lt "$KILLS" ] && [ $((SECONDS - start)) -lt "$KILL_WINDOW" ]; do
    sleep "$(python3 -c 'import random; print(round(random.uniform(0.2, 1.5), 2))')"
    pid_alive "$RELAYD_PID" || fail "relayd died on its own before kill $((kills + 1))"
    kill -KILL "$RELAYD_PID"
    wait "$RELAYD_PID" 2>/dev/null || true
    RELAYD_PID=
    kills=$((kills + 1))
    # Same config, same spool, same port: the restart must recover whatever was in flight.
    start_relayd "$T/relayd.conf" > /dev/null
    grep -qiE 'fatal|panic|corrupt' "$T/relayd.log" &&
        fail "relayd complained at restart $kills: $(grep -iE 'fatal|panic|corrupt' "$T/relayd.log")"
done
stop_load_client
say "$kills kills in $((SECONDS - start))s; $(cat "$T/client.out")"
acked=$(load_acked)
[ "$acked" -ge 50 ] || fail "only $acked messages acknowledged: too little traffic to prove anything"

say "draining: the last relayd delivers what is left"
wait_for_queue_empty 45 || { relayctl list >&2 || true; fail "spool not empty after the drain"; }
# Postfix may still be moving the last messages from its queue into the Maildir.
wait_for_maildir_count "$acked" 30 || true  # the verdict below tells

python3 - "$T/acked" "$MAILDIR" > "$T/verdict" <<'PY' || { cat "$T/verdict" >&2; fail "acknowledged mail lost"; }
import os, re, sys
acked = {}
for line in open(sys.argv[1]):
    n, qid = line.split()
    acked[int(n)] = qid
seen = {}
for sub in ("new", "cur"):
    d = os.path.join(sys.argv[2], sub)
    if not os.path.isdir(d):
        continue
    for name in os.listdir(d):
        with open(os.path.join(d, name), "rb") as f:
            head = f.read(8192).split(b"\n\n", 1)[0]
        m = re.search(rb"^Subject: crash-(\d+)\s*$", head, re.M | re.I)
        if m:
            n = int(m.group(1))
            seen[n] = seen.get(n, 0) + 1
lost = sorted(n for n in acked if n not in seen)
dups = sum(c - 1 for c in seen.values() if c > 1)
extra = len([n for n in seen if n not in acked])
print("acked %d, delivered %d distinct (%d files), duplicates %d, delivered but never "
      "acknowledged %d, lost %d" % (len(acked), len(seen), sum(seen.values()), dups, extra,
                                    len(lost)))
if lost:
    print("lost: " + " ".join("%d(%s)" % (n, acked[n]) for n in lost[:50]))
    sys.exit(1)
PY
say "$(cat "$T/verdict")"
[ -z "$(queue_ids)" ] || fail "spool not empty at the end"
pass
