#!/usr/bin/env python3
"""loadclient.py - numbered SMTP load for relayd's crash and spool-full tests.

Each message is unique: Subject "PREFIX-N" and Message-ID <PREFIX-N@lan.test>.  A line
"N QUEUE-ID" is appended (and flushed) to --acked only after relayd answered 250 to the
final dot, so the file lists exactly the messages relayd promised to deliver.

Modes:
  default       --threads sessions send continuously (several messages per connection,
                reconnecting on any error, e.g. while relayd is being killed) until the
                --stop file exists or --seconds have passed.
  --until-452   one session sends messages until relayd answers 452 (spool full); the
                reply is printed as "REFUSED <reply>" and the exit status is 0; 1 when no
                452 came within --max messages.
--bodies DIR keeps each acknowledged message's body (LF line ends) as DIR/N.body.
"""
import argparse
import os
import socket
import sys
import threading
import time

counter_lock = threading.Lock()
counter = [0]
ack_lock = threading.Lock()
stats = {"acked": 0, "refused": 0, "errors": 0}


def next_n():
    with counter_lock:
        counter[0] += 1
        return counter[0]


class Smtp:
    def __init__(self, port, timeout):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def reply(self):
        lines = []
        while True:
            while b"\n" not in self.buf:
                data = self.s.recv(65536)
                if not data:
                    raise ConnectionError("connection closed")
                self.buf += data
            line, self.buf = self.buf.split(b"\n", 1)
            line = line.rstrip(b"\r").decode("latin-1")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return line[:3], "\n".join(lines)

    def cmd(self, text):
        self.s.sendall(text.encode() + b"\r\n")
        return self.reply()

    def close(self):
        try:
            self.s.sendall(b"QUIT\r\n")
        except OSError:
            pass
        self.s.close()


def body_for(n, size):
    line = ("line of message %d " % n).ljust(76, "x")
    lines = []
    total = 0
    i = 0
    while total < size:
        lines.append("%05d %s" % (i, line))
        total += len(lines[-1]) + 2
        i += 1
    return "\n".join(lines) + "\n"


def message(prefix, n, size):
    hdr = ("From: <load@lan.test>\r\nTo: <user@example.com>\r\nSubject: %s-%d\r\n"
           "Message-ID: <%s-%d@lan.test>\r\n\r\n" % (prefix, n, prefix, n))
    body = body_for(n, size)
    wire = hdr + body.replace("\n", "\r\n")
    # RFC 5321 4.5.2 transparency (the generated body has no leading dots, but be right).
    wire = "\r\n".join("." + l if l.startswith(".") else l for l in wire.split("\r\n"))
    return wire, body


def send_one(c, args, n):
    """Returns (code, reply) of the final dot, or raises on a protocol/network error."""
    code, text = c.cmd("MAIL FROM:<load@lan.test>")
    if code != "250":
        return code, text
    code, text = c.cmd("RCPT TO:<user@example.com>")
    if code != "250":
        c.cmd("RSET")
        return code, text
    code, text = c.cmd("DATA")
    if code != "354":
        return code, text
    wire, body = message(args.prefix, n, args.size)
    c.s.sendall(wire.encode() + b".\r\n")  # wire ends with CRLF
    code, text = c.reply()
    if code == "250":
        qid = text.split()[-1] if "queued as" in text else "-"
        with ack_lock:
            with open(args.acked, "a") as f:
                f.write("%d %s\n" % (n, qid))
                f.flush()
            stats["acked"] += 1
        if args.bodies:
            with open(os.path.join(args.bodies, "%d.body" % n), "w") as f:
                f.write(body)
    return code, text


def worker(args, deadline):
    while time.time() < deadline and not os.path.exists(args.stop):
        try:
            c = Smtp(args.port, 10)
        except OSError:
            time.sleep(0.05)  # relayd is down (killed) or restarting
            continue
        try:
            code, _ = c.reply()
            if code != "220":
                raise ConnectionError("greeting " + code)
            code, _ = c.cmd("EHLO load.lan")
            if code != "250":
                raise ConnectionError("EHLO " + code)
            for _ in range(args.per_conn):
                if time.time() >= deadline or os.path.exists(args.stop):
                    break
                code, _ = send_one(c, args, next_n())
                if code != "250":
                    with ack_lock:
                        stats["refused"] += 1
                    break
                if args.pause:
                    time.sleep(args.pause)  # a paced device, not a flood
            c.close()
        except (OSError, ConnectionError):
            with ack_lock:
                stats["errors"] += 1
            try:
                c.s.close()
            except OSError:
                pass


def until_452(args):
    c = Smtp(args.port, 20)
    code, _ = c.reply()
    c.cmd("EHLO load.lan")
    for _ in range(args.max):
        n = next_n()
        code, text = send_one(c, args, n)
        if code == "452":
            print("REFUSED %d %s" % (n, text.replace("\n", " ")))
            # The session must still work after the refusal.
            code, text = c.cmd("RSET")
            print("RSET %s" % code)
            c.close()
            return 0
        if code != "250":
            print("UNEXPECTED %d %s" % (n, text.replace("\n", " ")))
            return 1
    print("NO-452 after %d messages" % args.max)
    return 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--prefix", default="load")
    ap.add_argument("--size", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--per-conn", type=int, default=5)
    ap.add_argument("--pause", type=float, default=0.0)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--acked", required=True)
    ap.add_argument("--stop", default="/nonexistent/stop")
    ap.add_argument("--bodies")
    ap.add_argument("--until-452", action="store_true")
    ap.add_argument("--max", type=int, default=1000)
    args = ap.parse_args()
    open(args.acked, "a").close()
    if args.until_452:
        return until_452(args)
    deadline = time.time() + args.seconds
    ts = [threading.Thread(target=worker, args=(args, deadline)) for _ in range(args.threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    print("loadclient: sent %d, acked %d, refused %d, broken sessions %d" %
          (counter[0], stats["acked"], stats["refused"], stats["errors"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
