#!/usr/bin/env python3
"""fake_upstream.py - a small SMTP server for fault injection in relayd's e2e tests.

Real Postfix cannot easily answer 421 in the middle of a session, refuse one recipient of
two, or drop the connection during DATA; this server can.  Cleartext only, no AUTH (relayd
talks to it with tls = none and no username).  Listens on 127.0.0.1 only.

  fake_upstream.py --port P --dir D [--rcpt-reply ADDR=REPLY]... [--fault MODE]
                   [--fault-times N]

--rcpt-reply bad@example.com='550 5.1.1 no such user' answers that RCPT with REPLY.
--dot-delay S waits S seconds before answering the end of data ("conn N dot" is logged
when the dot arrives, so a test can act while relayd waits for the reply).
--dot-reply-for ADDR='451 4.3.0 later' answers the end of data with REPLY when ADDR is one
of the transaction's recipients (the message is then not stored unless REPLY is 2xx).
--dot-421-every N answers every Nth end of data (counted over all sessions) with
"421 4.7.0 Service not available, closing transmission channel" and closes, as Microsoft
365 does now and then under load.
--fault MODE, for the first N connections (--fault-times, default 1):
  421-after-rcpt   answer the first RCPT with 421 and close
  drop-in-data     accept DATA, read a few lines of the message, then close without reply
  421-greeting     greet with 421 and close
Files in D: conn.log (one line per connection and command), msg-N.eml (each accepted
message as received, dot-unstuffed, CRLF), msg-N.env ("from ADDR" and "to ADDR" lines),
arrivals.log ("UNIXTIME N RCPTS" per accepted message).
"""
import argparse
import os
import socketserver
import threading
import time

lock = threading.Lock()
state = {"conns": 0, "sessions": 0, "msgs": 0}


def log(d, line):
    with lock, open(os.path.join(d, "conn.log"), "a") as f:
        f.write(line + "\n")


class Handler(socketserver.StreamRequestHandler):
    timeout = 30

    def send(self, line):
        self.wfile.write((line + "\r\n").encode())
        self.wfile.flush()

    def handle(self):
        a = self.server.args
        with lock:
            state["conns"] += 1
            n = state["conns"]
        # A greeting fault counts connections; the others count sessions (a client that
        # said EHLO), so that a test's "is the port open" probe does not use one up.
        fault = a.fault if a.fault == "421-greeting" and n <= a.fault_times else None
        log(a.dir, "conn %d fault=%s" % (n, fault))
        if fault == "421-greeting":
            self.send("421 4.3.2 fake upstream: try again later")
            return
        self.send("220 fake.upstream ESMTP fault injection")
        sender, rcpts = None, []
        while True:
            raw = self.rfile.readline(4096)
            if not raw:
                log(a.dir, "conn %d eof" % n)
                return
            line = raw.decode("latin-1").rstrip("\r\n")
            log(a.dir, "conn %d < %s" % (n, line))
            verb = line[:4].upper()
            if verb in ("EHLO", "HELO"):
                if a.fault and a.fault != "421-greeting":
                    with lock:
                        state["sessions"] += 1
                        sess = state["sessions"]
                    fault = a.fault if sess <= a.fault_times else None
                    log(a.dir, "conn %d session %d fault=%s" % (n, sess, fault))
                if verb == "EHLO":
                    self.send("250-fake.upstream")
                    self.send("250-8BITMIME")
                    self.send("250-ENHANCEDSTATUSCODES")
                    self.send("250 SIZE 52428800")
                else:
                    self.send("250 fake.upstream")
            elif verb == "MAIL":
                sender, rcpts = line[10:].strip(), []
                self.send("250 2.1.0 Ok")
            elif verb == "RCPT":
                addr = line[8:].strip().strip("<>").split(">")[0]
                if fault == "421-after-rcpt":
                    self.send("421 4.4.2 fake upstream: closing in the middle of the session")
                    return
                reply = a.rcpt_reply.get(addr.lower())
                if reply:
                    self.send(reply)
                else:
                    rcpts.append(addr)
                    self.send("250 2.1.5 Ok")
            elif verb == "DATA":
                if not rcpts:
                    self.send("554 5.5.1 no valid recipients")
                    continue
                self.send("354 End data with <CR><LF>.<CR><LF>")
                data, lines = [], 0
                while True:
                    raw = self.rfile.readline(1 << 20)
                    if not raw:
                        log(a.dir, "conn %d eof in DATA" % n)
                        return
                    lines += 1
                    if fault == "drop-in-data" and lines >= 3:
                        log(a.dir, "conn %d dropping in DATA" % n)
                        self.request.shutdown(2)
                        return
                    if raw in (b".\r\n", b".\n"):
                        break
                    if raw.startswith(b"."):
                        raw = raw[1:]
                    data.append(raw)
                log(a.dir, "conn %d dot" % n)
                if a.dot_421_every:
                    with lock:
                        state["dots"] = state.get("dots", 0) + 1
                        nth = state["dots"]
                    if nth % a.dot_421_every == 0:
                        log(a.dir, "conn %d dot 421" % n)
                        self.send("421 4.7.0 Service not available, closing transmission channel")
                        return
                if a.dot_delay:
                    time.sleep(a.dot_delay)
                special = [a.dot_reply_for[r.lower()] for r in rcpts if r.lower() in a.dot_reply_for]
                if special and not special[0].startswith("2"):
                    log(a.dir, "conn %d dot reply %s" % (n, special[0]))
                    self.send(special[0])
                    continue
                with lock:
                    state["msgs"] += 1
                    m = state["msgs"]
                base = os.path.join(a.dir, "msg-%d" % m)
                with open(base + ".eml", "wb") as f:
                    f.write(b"".join(data))
                with open(base + ".env", "w") as f:
                    f.write("from %s\n" % sender)
                    for r in rcpts:
                        f.write("to %s\n" % r)
                with lock, open(os.path.join(a.dir, "arrivals.log"), "a") as f:
                    f.write("%.3f %d %s\n" % (time.time(), m, ",".join(rcpts)))
                self.send("250 2.0.0 Ok: queued as FAKE%d" % m)
            elif verb == "RSET":
                sender, rcpts = None, []
                self.send("250 2.0.0 Ok")
            elif verb == "NOOP":
                self.send("250 2.0.0 Ok")
            elif verb == "QUIT":
                self.send("221 2.0.0 Bye")
                return
            else:
                self.send("502 5.5.2 command not implemented")


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--rcpt-reply", action="append", default=[])
    p.add_argument("--fault", choices=["421-after-rcpt", "drop-in-data", "421-greeting"])
    p.add_argument("--fault-times", type=int, default=1)
    p.add_argument("--dot-delay", type=float, default=0)
    p.add_argument("--dot-421-every", type=int, default=0)
    p.add_argument("--dot-reply-for", action="append", default=[])
    a = p.parse_args()
    a.rcpt_reply = dict((k.lower(), v) for k, v in (r.split("=", 1) for r in a.rcpt_reply))
    a.dot_reply_for = dict((k.lower(), v) for k, v in (r.split("=", 1) for r in a.dot_reply_for))
    os.makedirs(a.dir, exist_ok=True)
    srv = Server(("127.0.0.1", a.port), Handler)
    srv.args = a
    # Bounded life: a test that forgets us cannot leave us running for long.
    threading.Timer(300, srv.shutdown).start()
    srv.serve_forever()


if __name__ == "__main__":
    main()
