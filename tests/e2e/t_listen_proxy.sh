#!/usr/bin/env bash
# t_listen_proxy: proxy_protocol = v1 | v2 | any.  A PROXY header claiming client 10.1.2.3
# (only claimed: no traffic goes to that address) makes 10.1.2.3 the client everywhere: the
# allow list (10.1.2.0/24 admits it, a claimed 10.9.9.9 gets 554 5.7.1), the log and the
# Received: header of the message that arrives upstream.  A connection without a header,
# or with the wrong version, is closed without a session; one that sends half a header and
# closes is let go at once (not after the 10 s header timeout).  On an implicit-TLS listener
# the ClientHello may arrive in the same segment as the header: the handshake still works.
source "$(dirname "$0")/lib.sh"

start_postfix_upstream
make_ca
write_relayd_conf "$T/relayd.conf"
P1=$(free_port); P2=$(free_port); PA=$(free_port); PT=$(free_port)
cat >> "$T/relayd.conf" <<EOF2

[listener p1]
listen = 127.0.0.1:$P1
allow = 10.1.2.0/24
proxy_protocol = v1

[listener p2]
listen = 127.0.0.1:$P2
allow = 10.1.2.0/24
proxy_protocol = v2

[listener pany]
listen = 127.0.0.1:$PA
allow = 10.1.2.0/24, 2001:db8::/32
proxy_protocol = any

[listener ptls]
listen = 127.0.0.1:$PT
allow = 10.1.2.0/24
proxy_protocol = v1
tls = implicit
cert = $T/ca/server.pem
key = $T/ca/server.key
EOF2
start_relayd "$T/relayd.conf"
wait_for_port "$PA" 5 || fail "listener pany not up"

# v2 header: signature, version 2 PROXY, TCP over IPv4, 12 address bytes:
# 10.1.2.3 -> 127.0.0.1, ports 40000 -> 25.
V2_SIG='0d0a0d0a000d0a515549540a'
V2_OK="$V2_SIG 21 11 000c 0a010203 7f000001 9c40 0019"
V2_BAD="$V2_SIG 21 11 000c 0a090909 7f000001 9c40 0019"

say "1: v1 header for 10.1.2.3: served, and the message shows 10.1.2.3"
smtp_dialogue --port "$P1" <<'S' || fail "PROXY v1 dialogue failed"
>raw PROXY TCP4 10.1.2.3 127.0.0.1 40000 25\r\n
< 220
> EHLO behind-proxy
< 250
> MAIL FROM:<dev@example.net>
< 250
> RCPT TO:<user@example.com>
< 250
> DATA
< 354
> Subject: via proxy v1
>
> proxied
> .
< 250
> QUIT
< 221
S
f=$(wait_for_subject "via proxy v1" 30) || fail "the proxied message did not arrive"
grep -qE '^Received: from behind-proxy \(\[10\.1\.2\.3\]\)' "$f" ||
    fail "the Received: header does not name 10.1.2.3"
grep -qE 'client=10\.1\.2\.3' "$T/relayd.log" || fail "the log does not name client 10.1.2.3"

say "2: v1 header for 10.9.9.9 (outside allow): 554 5.7.1"
smtp_dialogue --port "$P1" <<'S' || fail "allow list did not use the PROXY address"
>raw PROXY TCP4 10.9.9.9 127.0.0.1 40000 25\r\n
<~ ^554 5\.7\.1
eof 5
S
grep -qE '10\.9\.9\.9' "$T/relayd.log" || fail "the refusal does not name 10.9.9.9"

say "3: no header on a v1 listener: closed without a session"
smtp_dialogue --port "$P1" <<'S' || fail "a client without PROXY header was served"
> EHLO sneaky
eof 10
S

say "4: v2 header for 10.1.2.3 served; for 10.9.9.9 refused; a v1 header refused"
smtp_dialogue --port "$P2" <<S || fail "PROXY v2 dialogue failed"
>hex $V2_OK
< 220
> EHLO v2client
< 250
> QUIT
< 221
S
smtp_dialogue --port "$P2" <<S || fail "PROXY v2 allow check failed"
>hex $V2_BAD
<~ ^554 5\.7\.1
eof 5
S
smtp_dialogue --port "$P2" <<'S' || fail "a v1 header on a v2 listener was accepted"
>raw PROXY TCP4 10.1.2.3 127.0.0.1 40000 25\r\n
eof 10
S
grep -qE 'connect from 10\.1\.2\.3.*listener=p2|listener=p2.*10\.1\.2\.3|10\.1\.2\.3.*p2' \
    "$T/relayd.log" || fail "the log does not show 10.1.2.3 on listener p2"

say "5: proxy_protocol = any takes both versions, and IPv6 in v1"
smtp_dialogue --port "$PA" <<S || fail "any: v2 failed"
>hex $V2_OK
< 220
> QUIT
< 221
S
smtp_dialogue --port "$PA" <<'S' || fail "any: v1 TCP6 failed"
>raw PROXY TCP6 2001:db8::7 ::1 40000 25\r\n
< 220
> QUIT
< 221
S
grep -qE '2001:db8::7' "$T/relayd.log" || fail "the log does not show the IPv6 client"

say "6: implicit TLS: PROXY header and ClientHello in one write; the session is TLS"
timeout 20 python3 - "$PT" "$T/ca/ca.pem" <<'PY' || fail "implicit TLS behind a PROXY header failed"
import socket, ssl, sys
port, ca = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(cafile=ca)
inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
tls = ctx.wrap_bio(inc, out, server_hostname="localhost")
sock = socket.create_connection(("127.0.0.1", port), timeout=10)

def step(fn, *a):
    # Runs fn until it stops wanting input, moving bytes between the BIOs and the socket.
    while True:
        try:
            r = fn(*a)
        except ssl.SSLWantReadError:
            if out.pending:
                sock.sendall(out.read())
            data = sock.recv(65536)
            if not data:
                raise SystemExit("relayd closed the connection")
            inc.write(data)
            continue
        if out.pending:
            sock.sendall(out.read())
        return r

try:
    tls.do_handshake()
except ssl.SSLWantReadError:
    pass
hello = out.read()
assert hello, "no ClientHello"
sock.sendall(b"PROXY TCP4 10.1.2.3 127.0.0.1 40000 25\r\n" + hello)  # one write
step(tls.do_handshake)

def line():
    buf = b""
    while not buf.endswith(b"\r\n"):
        buf += step(tls.read, 1)
    return buf.decode()

greet = line()
assert greet.startswith("220 "), greet
step(tls.write, b"QUIT\r\n")
bye = line()
assert bye.startswith("221 "), bye
print(tls.version(), greet.strip(), bye.strip())
PY
log_wait 'client=10\.1\.2\.3 TLS established' 5 || fail "no TLS session logged for 10.1.2.3"

say "7: half a header, then close: the disconnect is logged within 2 s, not after 10"
n0=$(grep -c 'lost connection during PROXY header' "$T/relayd.log" || true)
python3 - "$P1" <<'PY' || fail "could not send half a header"
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
s.sendall(b"PROXY TCP4 10.1.2")
s.close()
PY
for ((i = 0; i < 10; i++)); do
    n1=$(grep -c 'lost connection during PROXY header' "$T/relayd.log" || true)
    [ "$n1" -gt "$n0" ] && break
    sleep 0.2
done
[ "$n1" -gt "$n0" ] || fail "a truncated PROXY header held its connection for more than 2 s"
pass
