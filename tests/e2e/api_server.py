#!/usr/bin/python3
"""api_server.py - a local HTTPS emulation of Microsoft Graph's and the Gmail API's mail
sending endpoints, for relayd's end-to-end tests.  Loopback only; python3 stdlib (and nothing
else).

Usage: api_server.py --port P --cert CERT --key KEY --state-dir DIR [--token TOKEN]
                     [--fault SPEC]... [--delay SPEC]... [--max-concurrent-per-mailbox N]
                     [--ready-file F] [--host H]

Paths are the real APIs' (base URL https://127.0.0.1:P):
  Microsoft Graph v1.0
    POST   /v1.0/users/{m}/sendMail                 base64 MIME (text/plain) -> 202;
                                                    413 when the body exceeds 4 MiB
    POST   /v1.0/users/{m}/messages                 draft: base64 MIME or JSON -> 201 {"id"}
    PATCH  /v1.0/users/{m}/messages/{id}            JSON (singleValueExtendedProperties) -> 200
    POST   /v1.0/users/{m}/messages/{id}/attachments             fileAttachment < 3 MB -> 201
    POST   /v1.0/users/{m}/messages/{id}/attachments/createUploadSession  -> 201 {"uploadUrl"}
    PUT    /upload/{token}                          Content-Range chunks (multiples of 320 KiB
                                                    but the last, <= 60 MiB; no Authorization)
                                                    -> 200 {"nextExpectedRanges"}, 201 at the end
    POST   /v1.0/users/{m}/messages/{id}/send       -> 202 (recorded now, draft removed)
    DELETE /v1.0/users/{m}/messages/{id}            -> 204
    GET    /v1.0/users/{m}/mailFolders/drafts/messages?$filter=...   -> 200 {"value": [...]}
           (filter: singleValueExtendedProperties/Any(ep: ep/id eq 'String {GUID} Name
           X-Relayd-Queue-Id' and ep/value eq 'QID'); a draft's queue id comes from that
           property or from an X-Relayd-Queue-Id: header in its MIME)
    GET    /v1.0/users/{m}                          -> 200 {"id", "mail"} (health probe)
  Gmail v1
    POST   /gmail/v1/users/{u}/messages/send        JSON {"raw": base64url} -> 200
    POST   /upload/gmail/v1/users/{u}/messages/send?uploadType=media    message/rfc822
                                                    (<= 35 MB, else 413) -> 200;
                                                    uploadType=multipart (JSON + message)
    GET    /gmail/v1/users/{u}/profile              -> 200 {"emailAddress"}
Every request but the Graph upload URLs must carry "Authorization: Bearer TOKEN" (--token;
without it any bearer is accepted); a Graph upload URL that gets one answers 401, as the real
service does.

Knobs:
  --fault PATHREGEX=STATUS[:COUNT][:retry-after=SECS][:code=ErrorCode][:message=TEXT]
        the first COUNT requests (default: all) whose path (query included) matches get STATUS
        with a Graph-style error body, or a Gmail-style one on /gmail paths, and Retry-After
  --delay PATHREGEX=SECONDS   matching requests are answered that much later (PUT chunks of an
        upload session with "upload/=2": a test can kill relayd in the middle of one)
  --max-concurrent-per-mailbox N (default 4, Graph's limit): one more concurrent request for a
        mailbox gets 429 ApplicationThrottled and a "CONCURRENCY" line in requests.log
Output (in --state-dir DIR):
  NNNN.eml    each message sent, the MIME exactly as received (decoded from base64); for a
              message given as JSON, a MIME rendering of its recipients, subject and body
  NNNN.json   {"api": "graph-sendmail"|"graph-draft"|"gmail-raw"|"gmail-upload", "mailbox",
              "recipients" (To/Cc/Bcc, the addresses the provider delivers to, each once),
              "bcc", "saveToSentItems" (bool: sendMail as MIME true, JSON as asked, a draft
              false when it carries PR_DELETE_AFTER_SUBMIT "Boolean 0x0E01" = true, PATCHed
              or at creation), "attachments": [{"name",
              "contentType", "size", "sha256", "isInline", "contentId"}], "queueId"}
              written after NNNN.eml: a test waits for the .json
  requests.log  one line per request: "POST /v1.0/users/fax@corp.example/sendMail 202"
              (path decoded, query left out); "CONCURRENCY POST /path 429" for the excess
  drafts.json the drafts that exist now: [{"id", "mailbox", "queueId", "attachments"}]
The server writes --ready-file (the word "ready") once it listens; stop it by its pid
(SIGTERM).

api_server.py --compare SMTP.eml API.eml: exit 0 when the two are byte-identical but for
their To/Cc/Bcc fields (the only ones relayd's API copy may change), else say where they
differ and exit 1.
"""
import argparse
import base64
import binascii
import email.parser
import email.policy
import email.utils
import hashlib
import json
import os
import re
import secrets
import signal
import ssl
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GRAPH_SENDMAIL_MAX = 4 * 1024 * 1024   # a Graph request's body
GRAPH_ATTACH_MAX = 3 * 1024 * 1024     # a fileAttachment POSTed in one piece
GRAPH_UPLOAD_MAX = 150 * 1024 * 1024   # an attachment through an upload session
UPLOAD_CHUNK_UNIT = 320 * 1024         # chunks are multiples of this, but the last
UPLOAD_CHUNK_MAX = 60 * 1024 * 1024
GMAIL_MAX = 35 * 1024 * 1024           # the media upload endpoint's limit
BODY_MAX = 200 * 1024 * 1024           # what this server reads at all
QID_PROP = re.compile(r"Name\s+X-Relayd-Queue-Id$", re.I)

GRAPH_CODES = {400: "ErrorInvalidRequest", 401: "InvalidAuthenticationToken",
               403: "ErrorAccessDenied", 404: "ErrorItemNotFound",
               413: "ErrorRequestEntityTooLarge", 416: "InvalidRange",
               429: "ApplicationThrottled", 500: "generalException",
               503: "ServiceUnavailable", 504: "GatewayTimeout"}
GMAIL_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                404: "NOT_FOUND", 413: "FAILED_PRECONDITION", 429: "RESOURCE_EXHAUSTED",
                500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}

ARGS = None
LOCK = threading.Lock()
STATE = {"seq": 0, "drafts": {}, "sessions": {}, "inflight": {}}
FAULTS = []
DELAYS = []


class Fault:
    def __init__(self, spec):
        head, _, rest = spec.partition(":")
        regex, eq, status = head.rpartition("=")
        if not eq or not status.isdigit():
            raise ValueError("--fault %r: want PATHREGEX=STATUS[:...]" % spec)
        self.regex = re.compile(regex)
        self.status = int(status)
        self.count = None
        self.retry_after = None
        self.code = None
        self.message = None
        parts = rest.split(":") if rest else []
        i = 0
        while i < len(parts):
            p = parts[i]
            if p.isdigit():
                self.count = int(p)
            elif p.startswith("retry-after="):
                self.retry_after = p[len("retry-after="):]
            elif p.startswith("code="):
                self.code = p[len("code="):]
            elif p.startswith("message="):
                self.message = ":".join([p[len("message="):]] + parts[i + 1:])
                break
            else:
                raise ValueError("--fault %r: what is %r?" % (spec, p))
            i += 1

    def take(self, path):
        """True when this fault answers the request (counts it); call under LOCK."""
        if not self.regex.search(path):
            return False
        if self.count is None:
            return True
        if self.count > 0:
            self.count -= 1
            return True
        return False


GRAPH_AUDIENCE = ("https://graph.microsoft.com/.default", "Mail.Send")
GMAIL_AUDIENCE = ("https://www.googleapis.com/auth/gmail.send", "https://mail.google.com/")


def token_refused(token, gmail):
    """With --tokens-dir (oauth2_server.py's state): the reason a bearer token is refused, as
    the real service words it, or None.  The token must have been issued, be unexpired and be
    meant for this API (a token for outlook.office365.com does not open Graph)."""
    try:
        with open(os.path.join(ARGS.tokens_dir, "tokens")) as f:
            issued = {l.split()[0]: int(l.split()[1]) for l in f if len(l.split()) >= 2}
    except OSError:
        issued = {}
    if token not in issued:
        return "Access token validation failure. Invalid signature."
    if issued[token] < time.time():
        return "Lifetime validation failed, the token is expired."
    scopes = {}
    try:
        with open(os.path.join(ARGS.tokens_dir, "scopes")) as f:
            for l in f:
                if " " in l.strip():
                    t, sc = l.strip().split(" ", 1)
                    scopes[t] = sc.split()
    except OSError:
        pass
    want = GMAIL_AUDIENCE if gmail else GRAPH_AUDIENCE
    if not any(w in sc or sc.endswith("/" + w) for sc in scopes.get(token, []) for w in want):
        return "Access token validation failure. Invalid audience (scopes %s)." % (
            " ".join(scopes.get(token, [])) or "none")
    return None



def parse_delay(spec):
    regex, eq, secs = spec.rpartition("=")
    if not eq:
        raise ValueError("--delay %r: want PATHREGEX=SECONDS" % spec)
    return re.compile(regex), float(secs)


def log_request(line):
    with LOCK:
        with open(os.path.join(ARGS.state_dir, "requests.log"), "a") as f:
            f.write(line + "\n")


def write_atomic(name, data):
    path = os.path.join(ARGS.state_dir, name)
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def header_addresses(mime, names):
    """The addresses of the named headers, each once (case-insensitive), in order."""
    try:
        msg = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(
            mime, headersonly=True)
    except Exception:  # a message the provider would refuse; record what can be found
        return []
    out, seen = [], set()
    for name in names:
        values = [str(v) for v in msg.get_all(name, [])]
        for _, addr in email.utils.getaddresses(values):
            if addr and addr.lower() not in seen:
                seen.add(addr.lower())
                out.append(addr)
    return out


def mime_header(mime, name):
    try:
        msg = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(
            mime, headersonly=True)
        v = msg.get(name)
        return str(v).strip() if v is not None else None
    except Exception:
        return None


def record(api, mailbox, mime, save=None, attachments=None, queue_id=None):
    """Stores one sent message: NNNN.eml, then NNNN.json.  Returns NNNN."""
    with LOCK:
        STATE["seq"] += 1
        n = "%04d" % STATE["seq"]
    meta = {"api": api, "mailbox": mailbox,
            "recipients": header_addresses(mime, ("To", "Cc", "Bcc")),
            "bcc": header_addresses(mime, ("Bcc",)),
            "saveToSentItems": save,
            "attachments": attachments or [],
            "queueId": queue_id,
            "size": len(mime)}
    write_atomic(n + ".eml", mime)
    write_atomic(n + ".json", (json.dumps(meta, indent=1) + "\n").encode())
    return n


def json_message_mime(msg):
    """A JSON Graph message as the MIME the tests look at (recipients, subject, body)."""
    lines = []
    for hdr, key in (("To", "toRecipients"), ("Cc", "ccRecipients"), ("Bcc", "bccRecipients")):
        addrs = [r.get("emailAddress", {}).get("address", "") for r in msg.get(key, []) or []]
        if addrs:
            lines.append("%s: %s" % (hdr, ", ".join(addrs)))
    lines.append("Subject: %s" % msg.get("subject", ""))
    return ("\r\n".join(lines) + "\r\n\r\n" +
            (msg.get("body") or {}).get("content", "")).encode()


def dump_drafts():
    """DIR/drafts.json: the drafts that exist now (a crash test checks none is left over).
    Call under LOCK."""
    out = [{"id": did, "mailbox": d["mailbox"], "queueId": Handler.draft_qid(d),
            "attachments": len(d["attachments"])} for did, d in STATE["drafts"].items()]
    write_atomic("drafts.json", (json.dumps(out, indent=1) + "\n").encode())


def att_meta(name, ctype, data, is_inline=False, content_id=None):
    return {"name": name, "contentType": ctype, "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "isInline": bool(is_inline),
            "contentId": content_id}


def b64decode_strict(text, urlsafe=False):
    s = re.sub(r"\s+", "", text)
    s += "=" * (-len(s) % 4)
    if urlsafe:
        s = s.replace("-", "+").replace("_", "/")
    return base64.b64decode(s, validate=True)


class Handler(BaseHTTPRequestHandler):
    server_version = "api-emulator/1"
    protocol_version = "HTTP/1.1"
    timeout = 60  # a stuck client cannot hold a thread forever

    def log_message(self, fmt, *args):  # quiet; requests go to requests.log
        pass

    def setup(self):
        # The TLS handshake happens here, in the request's thread, not in the accepting
        # one: a client that connects and says nothing holds only its own thread.
        self.request.settimeout(self.timeout)
        self.request.do_handshake()
        super().setup()

    # ---- replies -----------------------------------------------------------------
    def reply(self, status, obj=None, headers=None):
        body = b"" if obj is None else json.dumps(obj).encode()
        self.send_response(status)
        if obj is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)
        self.status = status

    def error(self, status, code=None, message=None, retry_after=None):
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        if self.gmail:
            obj = {"error": {"code": status, "message": message or "emulated error",
                             "status": code or GMAIL_STATUS.get(status, "UNKNOWN"),
                             "errors": [{"message": message or "emulated error",
                                         "domain": "global", "reason": code or "error"}]}}
        else:
            obj = {"error": {"code": code or GRAPH_CODES.get(status, "ErrorInternalServerError"),
                             "message": message or "Emulated error.",
                             "innerError": {"request-id": secrets.token_hex(8),
                                            "date": time.strftime("%Y-%m-%dT%H:%M:%S")}}}
        self.reply(status, obj, headers)

    # ---- request plumbing --------------------------------------------------------
    def read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while len(out) <= BODY_MAX:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                out += self.rfile.read(size)
                self.rfile.readline()
            return bytes(out)
        length = int(self.headers.get("Content-Length", "0") or "0")
        if length > BODY_MAX:
            raise ValueError("body too large for the emulator")
        return self.rfile.read(length) if length > 0 else b""

    def handle_any(self):
        self.status = 0
        url = urllib.parse.urlsplit(self.path)
        self.rpath = urllib.parse.unquote(url.path)
        self.query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        self.full = urllib.parse.unquote(self.path)
        self.gmail = self.rpath.startswith("/gmail/") or self.rpath.startswith("/upload/gmail/")
        mailbox = None
        m = re.match(r"^/(?:v1\.0|gmail/v1|upload/gmail/v1)/users/([^/]+)", self.rpath)
        if m:
            mailbox = m.group(1).lower()
        counted = False
        try:
            try:
                self.body = self.read_body()
            except (ValueError, OSError):
                self.close_connection = True
                return self.error(413, None, "request body too large")
            if mailbox is not None:
                with LOCK:
                    n = STATE["inflight"].get(mailbox, 0)
                    if n >= ARGS.max_concurrent_per_mailbox:
                        over = True
                    else:
                        over = False
                        STATE["inflight"][mailbox] = n + 1
                        counted = True
                if over:
                    log_request("CONCURRENCY %s %s 429" % (self.command, self.rpath))
                    return self.error(429, "ApplicationThrottled",
                                      "Application is over its MailboxConcurrency limit.",
                                      retry_after=1)
            for regex, secs in DELAYS:
                if regex.search(self.full):
                    time.sleep(secs)
            with LOCK:
                fault = next((f for f in FAULTS if f.take(self.full)), None)
            if fault is not None:
                return self.error(fault.status, fault.code, fault.message, fault.retry_after)
            upload = self.rpath.startswith("/upload/") and not self.gmail
            auth = self.headers.get("Authorization")
            if upload:
                if auth is not None:
                    return self.error(401, "InvalidAuthenticationToken", "An upload URL is "
                                      "pre-authenticated: do not send an Authorization header.")
            else:
                if not auth or not auth.startswith("Bearer ") or len(auth) <= 7:
                    return self.error(401, "InvalidAuthenticationToken",
                                      "Access token is empty.")
                if ARGS.token is not None and auth[7:] != ARGS.token:
                    return self.error(401, "InvalidAuthenticationToken",
                                      "Access token validation failure. Invalid audience.")
                if ARGS.tokens_dir is not None:
                    why = token_refused(auth[7:], self.gmail)
                    if why:
                        return self.error(401, "InvalidAuthenticationToken", why)
            self.route(mailbox)
        except Exception as e:  # the emulator's own bug: say so, as a 500
            sys.stderr.write("api_server: %s %s: %r\n" % (self.command, self.path, e))
            if not self.status:
                self.error(500, None, "emulator error: %r" % e)
        finally:
            if counted:
                with LOCK:
                    STATE["inflight"][mailbox] -= 1
            log_request("%s %s %d" % (self.command, self.rpath, self.status))

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_any

    def route(self, mailbox):
        p, c = self.rpath, self.command
        g = re.match(r"^/v1\.0/users/[^/]+(/.*)?$", p)
        if g:
            rest = g.group(1) or ""
            if c == "GET" and rest == "":
                return self.reply(200, {"id": "00000000-0000-4000-8000-" + hashlib.sha256(
                    mailbox.encode()).hexdigest()[:12], "mail": mailbox,
                    "userPrincipalName": mailbox})
            if c == "POST" and rest == "/sendMail":
                return self.graph_sendmail(mailbox)
            if c == "POST" and rest == "/messages":
                return self.graph_draft(mailbox)
            if c == "GET" and rest == "/mailFolders/drafts/messages":
                return self.graph_list_drafts(mailbox)
            m = re.match(r"^/messages/([^/]+)(/.*)?$", rest)
            if m:
                return self.graph_message(mailbox, m.group(1), m.group(2) or "")
        m = re.match(r"^/upload/([A-Za-z0-9_-]+)$", p)
        if m and not self.gmail and c == "PUT":
            return self.graph_upload(m.group(1))
        if m and not self.gmail and c == "DELETE":  # cancelling an upload session
            with LOCK:
                gone = STATE["sessions"].pop(m.group(1), None)
            return self.reply(204) if gone else self.error(404, "ErrorItemNotFound",
                                                           "The upload session was not found.")
        m = re.match(r"^/gmail/v1/users/[^/]+/(profile|messages/send)$", p)
        if m and c == "GET" and m.group(1) == "profile":
            return self.reply(200, {"emailAddress": mailbox, "messagesTotal": 0,
                                    "threadsTotal": 0, "historyId": "1"})
        if m and c == "POST" and m.group(1) == "messages/send":
            return self.gmail_send(mailbox)
        if re.match(r"^/upload/gmail/v1/users/[^/]+/messages/send$", p) and c == "POST":
            return self.gmail_upload(mailbox)
        return self.error(404, "ResourceNotFound" if not self.gmail else None,
                          "no such endpoint: %s %s" % (c, p))

    # ---- Graph -------------------------------------------------------------------
    def mime_body(self, limit):
        """The base64 MIME of a Graph request, or None after answering the error."""
        if len(self.body) > limit:
            self.error(413, "ErrorRequestEntityTooLarge", "The request exceeds the maximum "
                       "supported size of %d bytes." % limit)
            return None
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "text/plain":
            self.error(400, "ErrorMimeContentInvalid", "MIME content must be sent as "
                       "Content-Type: text/plain (got %r)" % ctype)
            return None
        try:
            mime = b64decode_strict(self.body.decode("ascii"))
        except (binascii.Error, UnicodeDecodeError, ValueError):
            self.error(400, "ErrorMimeContentInvalidBase64String",
                       "Invalid base64 string for MIME content.")
            return None
        if b"\n" not in mime or header_addresses(mime, ("To", "Cc", "Bcc")) == []:
            self.error(400, "ErrorInvalidRecipients", "At least one recipient is not valid., "
                       "A message can't be sent because it contains no recipients.")
            return None
        return mime

    def json_body(self):
        try:
            return json.loads(self.body.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            self.error(400, "ErrorInvalidRequest", "Unable to read JSON request payload.")
            return None

    def graph_sendmail(self, mailbox):
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype == "application/json":  # the JSON form: only what the tests look at
            if len(self.body) > GRAPH_SENDMAIL_MAX:
                return self.error(413, "ErrorRequestEntityTooLarge", "too large")
            j = self.json_body()
            if j is None:
                return
            mime = json_message_mime(j.get("message", {}))
            record("graph-sendmail", mailbox, mime, j.get("saveToSentItems", True))
            return self.reply(202)
        mime = self.mime_body(GRAPH_SENDMAIL_MAX)
        if mime is None:
            return
        # Graph's MIME sendMail always keeps a copy in Sent Items (no switch for MIME).
        record("graph-sendmail", mailbox, mime, True, None, mime_header(mime, "X-Relayd-Queue-Id"))
        self.reply(202)

    def graph_draft(self, mailbox):
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        props = {}
        if ctype == "application/json":
            j = self.json_body()
            if j is None:
                return
            mime = json_message_mime(j)
            for ep in j.get("singleValueExtendedProperties", []) or []:
                props[ep.get("id", "")] = ep.get("value")
        else:
            if len(self.body) > GRAPH_SENDMAIL_MAX:
                return self.error(413, "ErrorRequestEntityTooLarge", "The request exceeds the "
                                  "maximum supported size of %d bytes." % GRAPH_SENDMAIL_MAX)
            if ctype != "text/plain":
                return self.error(400, "ErrorMimeContentInvalid", "want text/plain")
            try:
                mime = b64decode_strict(self.body.decode("ascii"))
            except (binascii.Error, UnicodeDecodeError, ValueError):
                return self.error(400, "ErrorMimeContentInvalidBase64String",
                                  "Invalid base64 string for MIME content.")
        did = "AAMkAD" + secrets.token_urlsafe(24).replace("-", "x").replace("_", "y")
        with LOCK:
            STATE["drafts"][did] = {"mailbox": mailbox, "mime": mime, "props": props,
                                    "attachments": [], "created": time.time()}
            dump_drafts()
        self.reply(201, {"id": did, "isDraft": True,
                         "createdDateTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    @staticmethod
    def delete_after_submit(d):
        """PR_DELETE_AFTER_SUBMIT (Boolean 0x0E01) true: Exchange deletes the draft once sent
        instead of keeping it in Sent Items."""
        for k, v in d["props"].items():
            if re.fullmatch(r"Boolean\s+0x0?E01", k.strip(), re.I):
                return v is True or str(v).strip().lower() == "true"
        return False

    @staticmethod
    def draft_qid(d):
        for k, v in d["props"].items():
            if QID_PROP.search(k.strip()):
                return v
        return mime_header(d["mime"], "X-Relayd-Queue-Id")

    def graph_list_drafts(self, mailbox):
        flt = (self.query.get("$filter") or [""])[0]
        want = None
        if flt:
            m = re.search(r"ep/id eq '([^']*)' and ep/value eq '([^']*)'", flt)
            if not m or not QID_PROP.search(m.group(1).strip()):
                return self.error(400, "ErrorInvalidUrlQueryFilter",
                                  "The query filter contains one or more invalid nodes.")
            want = m.group(2)
        with LOCK:
            drafts = [(did, d) for did, d in STATE["drafts"].items() if d["mailbox"] == mailbox]
        value = [{"id": did, "createdDateTime": time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(d["created"]))}
            for did, d in drafts if want is None or self.draft_qid(d) == want]
        self.reply(200, {"value": value})

    def graph_message(self, mailbox, did, rest):
        c = self.command
        with LOCK:
            d = STATE["drafts"].get(did)
        if d is None or d["mailbox"] != mailbox:
            return self.error(404, "ErrorItemNotFound", "The specified object was not found "
                              "in the store.")
        if c == "DELETE" and rest == "":
            with LOCK:
                STATE["drafts"].pop(did, None)
                dump_drafts()
            return self.reply(204)
        if c == "PATCH" and rest == "":
            j = self.json_body()
            if j is None:
                return
            with LOCK:
                for ep in j.get("singleValueExtendedProperties", []) or []:
                    d["props"][ep.get("id", "")] = ep.get("value")
                dump_drafts()
            return self.reply(200, {"id": did})
        if c == "POST" and rest == "/attachments":
            j = self.json_body()
            if j is None:
                return
            try:
                data = b64decode_strict(j.get("contentBytes", ""))
            except (binascii.Error, ValueError):
                return self.error(400, "ErrorInvalidRequest", "contentBytes is not base64")
            if len(data) >= GRAPH_ATTACH_MAX:
                return self.error(413, "ErrorRequestEntityTooLarge", "Attachments of 3 MB "
                                  "or more must be uploaded through an upload session.")
            with LOCK:
                d["attachments"].append(att_meta(j.get("name", ""), j.get("contentType", ""),
                                                 data, j.get("isInline"), j.get("contentId")))
                dump_drafts()
            return self.reply(201, {"id": secrets.token_urlsafe(12), "size": len(data)})
        if c == "POST" and rest == "/attachments/createUploadSession":
            j = self.json_body()
            if j is None:
                return
            item = j.get("AttachmentItem") or {}
            size = item.get("size")
            if item.get("attachmentType") != "file" or not isinstance(size, int) or size <= 0:
                return self.error(400, "ErrorInvalidRequest", "AttachmentItem wants "
                                  "attachmentType file and a size")
            if size > GRAPH_UPLOAD_MAX:
                return self.error(413, "ErrorRequestEntityTooLarge",
                                  "Attachments over 150 MB are not supported.")
            tok = secrets.token_urlsafe(24)
            with LOCK:
                STATE["sessions"][tok] = {"draft": did, "item": item, "data": bytearray()}
            exp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 900))
            return self.reply(201, {
                "uploadUrl": "https://%s:%d/upload/%s" % (ARGS.host, ARGS.port, tok),
                "expirationDateTime": exp, "nextExpectedRanges": ["0-"]})
        if c == "POST" and rest == "/send":
            with LOCK:
                if STATE["drafts"].pop(did, None) is None:  # a concurrent send or delete
                    return self.error(404, "ErrorItemNotFound", "The specified object was "
                                      "not found in the store.")
                dump_drafts()
            record("graph-draft", mailbox, d["mime"], not self.delete_after_submit(d),
                   d["attachments"], self.draft_qid(d))
            return self.reply(202)
        return self.error(404, "ResourceNotFound", "no such endpoint: %s %s" % (c, self.rpath))

    def graph_upload(self, tok):
        with LOCK:
            s = STATE["sessions"].get(tok)
        if s is None:
            return self.error(404, "ErrorItemNotFound", "The upload session was not found.")
        size = s["item"]["size"]
        m = re.match(r"^bytes (\d+)-(\d+)/(\d+)$", self.headers.get("Content-Range", ""))
        if not m:
            return self.error(400, "InvalidContentRange", "Content-Range bytes a-b/N wanted")
        a, b, n = (int(x) for x in m.groups())
        got = len(s["data"])
        if n != size or b < a or b >= n or b - a + 1 != len(self.body):
            return self.error(400, "InvalidContentRange", "Content-Range %s does not match "
                              "the body (%d bytes) or the size %d" %
                              (m.group(0), len(self.body), size))
        if a != got:
            return self.error(416, "InvalidRange", "The uploaded fragment overlaps or skips: "
                              "next expected range is %d-" % got)
        last = b == n - 1
        if len(self.body) > UPLOAD_CHUNK_MAX or (not last and len(self.body) % UPLOAD_CHUNK_UNIT):
            return self.error(400, "InvalidChunkSize", "Chunks must be multiples of 320 KiB "
                              "(but the last) and at most 60 MiB.")
        s["data"] += self.body
        if not last:
            exp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 900))
            return self.reply(200, {"expirationDateTime": exp,
                                    "nextExpectedRanges": ["%d-" % (b + 1)]})
        item = s["item"]
        with LOCK:
            STATE["sessions"].pop(tok, None)
            d = STATE["drafts"].get(s["draft"])
            if d is not None:
                d["attachments"].append(att_meta(item.get("name", ""),
                                                 item.get("contentType", ""), bytes(s["data"]),
                                                 item.get("isInline"), item.get("contentId")))
                dump_drafts()
        if d is None:
            return self.error(404, "ErrorItemNotFound", "The draft of this upload is gone.")
        self.reply(201, None, {"Location": "https://%s:%d/v1.0/users/%s/messages/%s" %
                               (ARGS.host, ARGS.port, d["mailbox"], s["draft"])})

    # ---- Gmail -------------------------------------------------------------------
    def gmail_send(self, mailbox):
        j = self.json_body()
        if j is None:
            return
        try:
            mime = b64decode_strict(j.get("raw", ""), urlsafe=True)
        except (binascii.Error, ValueError):
            return self.error(400, "invalidArgument", "Invalid value for ByteString: raw")
        return self.gmail_record("gmail-raw", mailbox, mime)

    def gmail_upload(self, mailbox):
        kind = (self.query.get("uploadType") or [""])[0]
        if len(self.body) > GMAIL_MAX:
            return self.error(413, "uploadTooLarge", "Request too large: %d bytes, the "
                              "limit is %d." % (len(self.body), GMAIL_MAX))
        ctype = self.headers.get("Content-Type", "")
        if kind == "media":
            if ctype.split(";")[0].strip().lower() != "message/rfc822":
                return self.error(400, "badContent", "Media type '%s' is not supported. "
                                  "Valid media types: [message/*]" % ctype)
            return self.gmail_record("gmail-upload", mailbox, self.body)
        if kind == "multipart":
            m = re.search(r'boundary="?([^";]+)"?', ctype)
            if not m:
                return self.error(400, "badContent", "multipart without a boundary")
            delim = b"--" + m.group(1).encode()
            parts = self.body.split(delim)
            for part in parts[1:]:
                if part.startswith(b"--"):
                    break
                head, sep, content = part.partition(b"\r\n\r\n")
                if sep and re.search(rb"(?i)content-type:\s*message/", head):
                    if content.endswith(b"\r\n"):
                        content = content[:-2]
                    return self.gmail_record("gmail-upload", mailbox, content)
            return self.error(400, "badContent", "no message/rfc822 part")
        return self.error(400, "invalidArgument", "uploadType %r not supported" % kind)

    def gmail_record(self, api, mailbox, mime):
        if len(mime) > GMAIL_MAX:
            return self.error(413, "uploadTooLarge", "Message too large.")
        if not header_addresses(mime, ("To", "Cc", "Bcc")):
            return self.error(400, "invalidArgument", "Recipient address required")
        record(api, mailbox, mime, None, None, mime_header(mime, "X-Relayd-Queue-Id"))
        mid = secrets.token_hex(8)
        self.reply(200, {"id": mid, "threadId": mid, "labelIds": ["SENT"]})


def strip_recipient_fields(mime):
    """The message without its To/Cc/Bcc fields (each with its continuation lines)."""
    # The header section with its last line's terminator; the rest is the blank line + body.
    i = mime.find(b"\r\n\r\n")
    j = mime.find(b"\n\n")
    cut = i + 2 if i >= 0 and (j < 0 or i < j) else (j + 1 if j >= 0 else len(mime))
    head, sep, body = mime[:cut], b"", mime[cut:]
    out, skip = [], False
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):
            if not skip:
                out.append(line)
            continue
        skip = re.match(rb"(?i)(to|cc|bcc)[ \t]*:", line) is not None
        if not skip:
            out.append(line)
    return b"".join(out) + sep + body


def compare(smtp_path, api_path):
    """--compare SMTP API: exit 0 when the API copy equals the SMTP copy but for To/Cc/Bcc
    (what apimime_for_api() may change); else print where they differ, exit 1."""
    a = strip_recipient_fields(open(smtp_path, "rb").read())
    b = strip_recipient_fields(open(api_path, "rb").read())
    if a == b:
        return 0
    i = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
    sys.stdout.write("differ at byte %d (sizes %d, %d):\n  smtp: %r\n  api:  %r\n" %
                     (i, len(a), len(b), a[max(0, i - 40):i + 40], b[max(0, i - 40):i + 40]))
    return 1


def main():
    global ARGS
    if len(sys.argv) == 4 and sys.argv[1] == "--compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--token")
    ap.add_argument("--tokens-dir", help="oauth2_server.py's state dir: accept only the tokens "
                    "it issued, unexpired, for this API's audience")
    ap.add_argument("--fault", action="append", default=[])
    ap.add_argument("--delay", action="append", default=[])
    ap.add_argument("--max-concurrent-per-mailbox", type=int, default=4)
    ap.add_argument("--ready-file")
    ap.add_argument("--host", default="127.0.0.1", help="host name in uploadUrl")
    ARGS = ap.parse_args()
    FAULTS.extend(Fault(s) for s in ARGS.fault)
    DELAYS.extend(parse_delay(s) for s in ARGS.delay)
    os.makedirs(ARGS.state_dir, exist_ok=True)
    # Numbering goes on after a restart of the emulator, so that no file is overwritten.
    done = [int(f[:4]) for f in os.listdir(ARGS.state_dir) if re.match(r"^\d{4}\.json$", f)]
    STATE["seq"] = max(done, default=0)

    ThreadingHTTPServer.daemon_threads = True
    httpd = ThreadingHTTPServer(("127.0.0.1", ARGS.port), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(ARGS.cert, ARGS.key)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)

    def stop(signum, frame):
        threading.Thread(target=httpd.shutdown, daemon=True).start()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if ARGS.ready_file:
        with open(ARGS.ready_file + ".tmp", "w") as f:
            f.write("ready\n")
        os.replace(ARGS.ready_file + ".tmp", ARGS.ready_file)
    sys.stderr.write("api_server: listening on 127.0.0.1:%d\n" % ARGS.port)
    sys.stderr.flush()
    httpd.serve_forever()
    httpd.server_close()


if __name__ == "__main__":
    main()
