#!/usr/bin/env bash
# t_in_tls: implicit TLS is bounded before the handshake, and a failed handshake is explained.
# (1) a client outside allow gets no handshake at all (before: a full handshake, then 554);
# (2) a client that never sends a ClientHello is dropped after handshake_timeout (before:
# command_timeout, 300 s); (3) sessions in the handshake count against
# max_connections_per_client; (4) a TLS-1.0-only client's failure is logged with the
# versions it offered and the tls_priority change that would let it in.
source "$(dirname "$0")/lib.sh"

write_relayd_conf "$T/relayd.conf"
P1=$(free_port)
P2=$(free_port)
relayd_conf "$T/relayd.conf" "relayd" "max_connections_per_client = 2"
relayd_conf "$T/relayd.conf" "listener closed" "listen = 127.0.0.1:$P1" \
    "allow = 127.0.0.2/32" \
    "tls = implicit" \
    "cert = $T/ca/server.pem" \
    "key = $T/ca/server.key"
relayd_conf "$T/relayd.conf" "listener smtps" "listen = 127.0.0.1:$P2" \
    "allow = 127.0.0.0/8" \
    "tls = implicit" \
    "cert = $T/ca/server.pem" \
    "key = $T/ca/server.key" \
    "handshake_timeout = 2s"
start_relayd "$T/relayd.conf"

say "1: a client outside allow gets no TLS handshake"
timeout 20 python3 - "$P1" <<'PY' || fail "a client outside allow completed a TLS handshake"
import socket, ssl, sys
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
try:
    ctx.wrap_socket(s, server_hostname="localhost")
except (ssl.SSLError, OSError) as e:
    print("handshake refused as expected:", e)
    sys.exit(0)
sys.exit(1)
PY
log_wait 'reject: .*listener=closed.*reason=not_allowed.*setting: allow' 5 ||
    fail "no refusal line naming allow"
grep -qE 'TLS established' "$T/relayd.log" && fail "a TLS session was set up for a refused client"

say "2: no ClientHello: closed after handshake_timeout, not command_timeout"
timeout 30 python3 - "$P2" <<'PY' || fail "a silent client was not dropped by handshake_timeout"
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20)
t0 = time.time()
data = s.recv(100)   # relayd closes: b"" (bounded by the 20 s socket timeout)
print("closed after %.1f s, got %r" % (time.time() - t0, data))
sys.exit(0 if data == b"" else 1)
PY
log_wait 'reason=tls_failed: no TLS handshake within handshake_timeout' 5 ||
    fail "the handshake timeout was not logged as a refusal"

say "3: sessions still in the handshake count against max_connections_per_client (2)"
timeout 30 python3 - "$P2" <<'PY' || fail "a third handshake-stage session was not refused"
import socket, sys, time
port = int(sys.argv[1])
a = socket.create_connection(("127.0.0.1", port), timeout=10)
b = socket.create_connection(("127.0.0.1", port), timeout=10)
time.sleep(0.3)
c = socket.create_connection(("127.0.0.1", port), timeout=10)
data = c.recv(100)   # closed at once: relayd cannot answer in plaintext on a TLS port
print("third connection got %r" % data)
sys.exit(0 if data == b"" else 1)
PY
log_wait 'reason=max_connections_per_client' 5 || fail "the per-client limit was not logged"

say "4: a TLS 1.0-only client: the log names its versions and the tls_priority fix"
timeout 20 gnutls-cli --insecure --priority 'NORMAL:-VERS-ALL:+VERS-TLS1.0' -p "$P2" 127.0.0.1 \
    < /dev/null > "$T/gnutls-cli.log" 2>&1 && fail "a TLS 1.0 handshake succeeded"
log_wait 'reason=tls_failed: TLS handshake failed: .*client offered: TLS1\.0; hint: .*\+VERS-TLS1\.0' 5 ||
    fail "the TLS failure line does not name the client's version and the fix"
check_relayd_exit
pass
