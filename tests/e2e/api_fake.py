#!/usr/bin/python3
"""api_fake.py - a small local HTTPS emulation of Microsoft Graph sendMail and the Gmail API
send endpoints for relayd's end-to-end tests (t_api_*.sh).  Loopback only; stop it by pid.

A stand-in for h-mime's fuller tests/e2e/api_server.py (same command line and output
layout), limited to what the transports use today:
  POST /v1.0/users/{m}/sendMail                 base64 MIME, text/plain -> 202 (413 over 4 MB)
  GET  /v1.0/users/{m}                          -> 200 {"id", "mail"}
  POST /gmail/v1/users/{m}/messages/send        {"raw": base64url} -> 200
  POST /upload/gmail/v1/users/{m}/messages/send?uploadType=media  message/rfc822 -> 200
  GET  /gmail/v1/users/{m}/profile              -> 200 {"emailAddress"}
Bearer check: --token TOKEN, or --tokens-file FILE (oauth2_server.py's "tokens": the first
word of each line is a valid token); else any bearer is accepted.
Faults: --fault 'PATHREGEX=STATUS[:COUNT][:retry-after=SECS][:code=CODE][:message=TEXT]'
(repeatable): the first COUNT matching requests (default all) get STATUS with a Graph-style
(or, under /gmail, Gmail-style) JSON error body and Retry-After when given.
Output in --state-dir: NNNN.eml (the decoded MIME as received), NNNN.json ({"api",
"mailbox", "recipients", "bcc"}), requests.log ("METHOD PATH STATUS TIME" per request).
"""
import argparse
import base64
import email
import email.policy
import email.utils
import json
import os
import re
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ARGS = None
LOCK = threading.Lock()
FAULTS = []  # [regex, status, remaining (None: all), retry_after, code, message]
SEQ = [0]


def parse_fault(spec):
    rx, _, rest = spec.partition("=")
    parts = rest.split(":")
    f = [re.compile(rx), int(parts[0]), None, None, None, None]
    for p in parts[1:]:
        if p.isdigit():
            f[2] = int(p)
        elif p.startswith("retry-after="):
            f[3] = p.split("=", 1)[1]
        elif p.startswith("code="):
            f[4] = p.split("=", 1)[1]
        elif p.startswith("message="):
            f[5] = p.split("=", 1)[1]
    return f


def valid_token(tok):
    if ARGS.token:
        return tok == ARGS.token
    if ARGS.tokens_file:
        try:
            with open(ARGS.tokens_file) as fh:
                return any(l.split()[:1] == [tok] for l in fh)
        except OSError:
            return False
    return bool(tok)


def record(api, mailbox, mime):
    msg = email.message_from_bytes(mime, policy=email.policy.compat32)
    rcpts = []
    for h in ("To", "Cc", "Bcc"):
        rcpts += [a.lower() for _, a in email.utils.getaddresses(msg.get_all(h, [])) if a]
    bcc = [a.lower() for _, a in email.utils.getaddresses(msg.get_all("Bcc", [])) if a]
    with LOCK:
        SEQ[0] += 1
        n = SEQ[0]
    base = os.path.join(ARGS.state_dir, "%04d" % n)
    with open(base + ".eml.tmp", "wb") as f:
        f.write(mime)
    with open(base + ".json", "w") as f:
        json.dump({"api": api, "mailbox": mailbox, "recipients": rcpts, "bcc": bcc}, f)
    os.rename(base + ".eml.tmp", base + ".eml")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def answer(self, status, obj=None, headers=None):
        body = json.dumps(obj).encode() if obj is not None else b""
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if body:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        with LOCK, open(os.path.join(ARGS.state_dir, "requests.log"), "a") as f:
            f.write("%s %s %d %.3f\n" % (self.command, self.path, status, time.time()))

    def error(self, status, code, message, retry_after=None):
        gmail = "/gmail/" in self.path
        if gmail:
            obj = {"error": {"code": status, "message": message,
                             "errors": [{"message": message, "reason": code}],
                             "status": code}}
        else:
            obj = {"error": {"code": code, "message": message}}
        self.answer(status, obj, {"Retry-After": retry_after} if retry_after else None)

    def handle_any(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not valid_token(auth[7:]):
            return self.error(401, "InvalidAuthenticationToken", "Access token validation failure.")
        with LOCK:
            for f in FAULTS:
                if f[0].search(self.path) and (f[2] is None or f[2] > 0):
                    if f[2] is not None:
                        f[2] -= 1
                    fault = list(f)
                    break
            else:
                fault = None
        if fault:
            return self.error(fault[1], fault[4] or "ErrorFault", fault[5] or "injected fault",
                              fault[3])
        m = re.match(r"^/v1\.0/users/([^/?]+)/sendMail$", self.path)
        if m and self.command == "POST":
            if n > 4 * 1024 * 1024:
                return self.error(413, "ErrorRequestEntityTooLarge", "The request is too large.")
            record("graph-sendmail", m.group(1), base64.b64decode(body, validate=True))
            return self.answer(202)
        m = re.match(r"^/v1\.0/users/([^/?]+)$", self.path)
        if m and self.command == "GET":
            return self.answer(200, {"id": "1", "mail": m.group(1)})
        m = re.match(r"^/gmail/v1/users/([^/?]+)/profile$", self.path)
        if m and self.command == "GET":
            return self.answer(200, {"emailAddress": m.group(1)})
        m = re.match(r"^/gmail/v1/users/([^/?]+)/messages/send$", self.path)
        if m and self.command == "POST":
            raw = json.loads(body)["raw"]
            record("gmail-raw", m.group(1), base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
            return self.answer(200, {"id": "m1", "threadId": "t1", "labelIds": ["SENT"]})
        m = re.match(r"^/upload/gmail/v1/users/([^/?]+)/messages/send\?uploadType=media$", self.path)
        if m and self.command == "POST":
            if n > 35 * 1024 * 1024:
                return self.error(413, "tooLarge", "Message too large")
            record("gmail-upload", m.group(1), body)
            return self.answer(200, {"id": "m2", "threadId": "t2", "labelIds": ["SENT"]})
        return self.error(404, "ResourceNotFound", "no such endpoint: %s %s" % (self.command, self.path))

    do_GET = do_POST = do_PUT = do_DELETE = handle_any


def main():
    global ARGS
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--token")
    ap.add_argument("--tokens-file")
    ap.add_argument("--fault", action="append", default=[])
    ap.add_argument("--ready-file")
    ARGS = ap.parse_args()
    os.makedirs(ARGS.state_dir, exist_ok=True)
    FAULTS.extend(parse_fault(s) for s in ARGS.fault)
    # A restart (new faults) goes on numbering after the messages already recorded.
    SEQ[0] = len([f for f in os.listdir(ARGS.state_dir) if f.endswith(".eml")])
    srv = ThreadingHTTPServer(("127.0.0.1", ARGS.port), Handler)
    srv.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(ARGS.cert, ARGS.key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    if ARGS.ready_file:
        with open(ARGS.ready_file, "w") as f:
            f.write("ready\n")
    srv.serve_forever()


if __name__ == "__main__":
    main()
