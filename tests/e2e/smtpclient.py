#!/usr/bin/env python3
"""smtpclient.py - a scripted raw-socket SMTP client for relayd's end-to-end tests.

It plays the quirky dialogues real devices use (spaces inside angle brackets, bare LF, no
HELO, every command in one write, AUTH LOGIN typed by hand, PROXY headers) and checks the
server's exact reply bytes.  Usage:

    smtpclient.py [--host 127.0.0.1] --port N [--source ADDR] [--timeout S] [SCRIPT|-]

The script (a file, or standard input) has one step per line; '#' starts a comment line:

    > TEXT        send TEXT followed by CRLF
    >lf TEXT      send TEXT followed by a bare LF
    >raw TEXT     send TEXT as is (use \\r \\n \\t \\xHH escapes for the line ends)
    >hex HEX      send bytes given in hex (spaces ignored): PROXY v2 headers
    >b64 TEXT     send base64(TEXT) followed by CRLF (AUTH LOGIN / PLAIN answers, \\0 works)
    >cram USER PASS   answer the last 334 CRAM-MD5 challenge
    >file PATH    send the file's bytes as they are
    >big N CHAR   send N copies of CHAR followed by CRLF (over-long lines)
    < CODE [TEXT] read one (multi-line) reply; its code must start with CODE and, when TEXT
                  is given, its last line must be exactly "CODE TEXT"
    <~ REGEX      read one reply; some line of it must match REGEX (re.search)
    <* N CODE     read N replies, each starting with CODE (pipelining)
    <until CODE   read replies (at most 20) until one starts with CODE
    eof           the server must close the connection (reading returns nothing) in time
    noeof S       nothing may arrive and the connection must stay open for S seconds
    tls           STARTTLS already answered 220: wrap the socket in TLS (no verification)
    shut          shut down our sending side (the server sees EOF)
    sleep S       pause S seconds
    close         close the connection now (a client that disappears)

Every byte sent and received is printed as a transcript ("C: ", "S: ").  The exit status is
0 when every expectation held, 1 on the first one that did not (with the reason), 2 on a
usage error.  Every read is bounded by --timeout.
"""
import argparse
import base64
import binascii
import hashlib
import hmac
import re
import socket
import ssl
import sys
import time


class Failed(Exception):
    pass


def unescape(text):
    """Turns \\r, \\n, \\t, \\0, \\\\ and \\xHH in a script argument into bytes."""
    out = bytearray()
    i = 0
    raw = text.encode("latin-1")
    while i < len(raw):
        c = raw[i:i + 1]
        if c == b"\\" and i + 1 < len(raw):
            n = raw[i + 1:i + 2]
            if n == b"x" and i + 3 < len(raw) + 1:
                out += bytes([int(raw[i + 2:i + 4], 16)])
                i += 4
                continue
            out += {b"r": b"\r", b"n": b"\n", b"t": b"\t", b"0": b"\0", b"\\": b"\\"}.get(n, b"\\" + n)
            i += 2
            continue
        out += c
        i += 1
    return bytes(out)


class Client:
    def __init__(self, host, port, source, timeout):
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if source:
            self.sock.bind((source, 0))
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.buf = b""
        self.last_reply = []

    def send(self, data):
        shown = data.decode("latin-1")
        for part in shown.splitlines(True) or [shown]:
            print("C: " + part.rstrip("\r\n").replace("\r", "\\r") + ("" if part.endswith("\n") else "  [no line end]"))
        self.sock.sendall(data)

    def _fill(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout()
        self.sock.settimeout(remaining)
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError()
        self.buf += chunk

    def line(self, deadline):
        while b"\n" not in self.buf:
            self._fill(deadline)
        line, _, self.buf = self.buf.partition(b"\n")
        if line.endswith(b"\r"):
            line = line[:-1]
        else:
            print("S: (bare LF from the server)")
        text = line.decode("latin-1")
        print("S: " + text)
        return text

    def reply(self):
        """One reply (all its continuation lines)."""
        deadline = time.monotonic() + self.timeout
        lines = []
        try:
            while True:
                text = self.line(deadline)
                lines.append(text)
                if len(text) < 4 or text[3] != "-":
                    break
        except socket.timeout:
            raise Failed("timed out after %ss waiting for a reply (got %r)" % (self.timeout, lines))
        except EOFError:
            raise Failed("connection closed while waiting for a reply (got %r)" % lines)
        except ConnectionResetError:
            raise Failed("connection reset while waiting for a reply (got %r)" % lines)
        self.last_reply = lines
        return lines

    def expect_eof(self, secs):
        deadline = time.monotonic() + secs
        try:
            while True:
                self.line(deadline)
        except EOFError:
            print("S: (connection closed)")
            return
        except ConnectionResetError:
            print("S: (connection reset)")
            return
        except socket.timeout:
            raise Failed("the server did not close the connection within %ss" % secs)

    def expect_quiet(self, secs):
        deadline = time.monotonic() + secs
        try:
            text = self.line(deadline)
        except socket.timeout:
            return
        except (EOFError, ConnectionResetError):
            raise Failed("the server closed the connection within %ss" % secs)
        raise Failed("unexpected reply within %ss: %r" % (secs, text))


def run(client, steps):
    for lineno, step in steps:
        verb, _, arg = step.partition(" ")
        if verb == ">":
            client.send(arg.encode("latin-1") + b"\r\n")
        elif verb == ">lf":
            client.send(arg.encode("latin-1") + b"\n")
        elif verb == ">raw":
            client.send(unescape(arg))
        elif verb == ">hex":
            client.send(binascii.unhexlify(re.sub(r"\s+", "", arg)))
        elif verb == ">b64":
            client.send(base64.b64encode(unescape(arg)) + b"\r\n")
        elif verb == ">cram":
            user, password = arg.split(" ", 1)
            last = client.last_reply[-1] if client.last_reply else ""
            if not last.startswith("334 "):
                raise Failed("line %d: no 334 challenge to answer (last reply %r)" % (lineno, last))
            challenge = base64.b64decode(last[4:])
            digest = hmac.new(password.encode(), challenge, hashlib.md5).hexdigest()
            client.send(base64.b64encode(("%s %s" % (user, digest)).encode()) + b"\r\n")
        elif verb == ">file":
            with open(arg, "rb") as f:
                client.send(f.read())
        elif verb == ">big":
            n, ch = arg.split(" ", 1)
            data = ch.encode("latin-1") * int(n)
            print("C: (%d bytes of %r)" % (len(data), ch))
            client.sock.sendall(data + b"\r\n")
        elif verb == "<":
            want = arg.split(" ", 1)
            lines = client.reply()
            if not lines[0].startswith(want[0]):
                raise Failed("line %d: want a %s reply, got %r" % (lineno, want[0], lines))
            if len(want) > 1 and lines[-1] != arg:
                raise Failed("line %d: want exactly %r, got %r" % (lineno, arg, lines[-1]))
        elif verb == "<~":
            lines = client.reply()
            if not any(re.search(arg, text) for text in lines):
                raise Failed("line %d: no reply line matches %r: %r" % (lineno, arg, lines))
        elif verb == "<*":
            n, code = arg.split(" ", 1)
            for i in range(int(n)):
                lines = client.reply()
                if not lines[0].startswith(code):
                    raise Failed("line %d: reply %d of %s: want %s, got %r" % (lineno, i + 1, n, code, lines))
        elif verb == "<until":
            for i in range(20):
                lines = client.reply()
                if lines[0].startswith(arg):
                    break
            else:
                raise Failed("line %d: no %s reply within 20 replies" % (lineno, arg))
        elif verb == "eof":
            client.expect_eof(float(arg or client.timeout))
        elif verb == "noeof":
            client.expect_quiet(float(arg))
        elif verb == "tls":
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            client.sock.settimeout(client.timeout)
            client.sock = ctx.wrap_socket(client.sock, server_hostname="localhost")
            if client.buf:
                raise Failed("line %d: plaintext left over after STARTTLS: %r" % (lineno, client.buf))
            print("C: (TLS established: %s %s)" % (client.sock.version(), client.sock.cipher()[0]))
        elif verb == "shut":
            client.sock.shutdown(socket.SHUT_WR)
            print("C: (shutdown)")
        elif verb == "sleep":
            time.sleep(float(arg))
        elif verb == "close":
            client.sock.close()
            print("C: (closed)")
            return
        else:
            raise Failed("line %d: unknown step %r" % (lineno, step))


def main():
    ap = argparse.ArgumentParser(description="scripted raw SMTP client")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--source", default=None, help="local address to connect from")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("script", nargs="?", default="-")
    a = ap.parse_args()
    text = sys.stdin.read() if a.script == "-" else open(a.script).read()
    steps = [(i + 1, l.rstrip("\n")) for i, l in enumerate(text.splitlines())
             if l.strip() and not l.lstrip().startswith("#")]
    try:
        client = Client(a.host, a.port, a.source, a.timeout)
        run(client, steps)
    except Failed as e:
        print("smtpclient: FAIL: %s" % e)
        return 1
    except OSError as e:
        print("smtpclient: FAIL: %s" % e)
        return 1
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
