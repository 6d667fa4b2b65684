#!/usr/bin/python3
"""xoauth2_smtpd.py - an SMTP submission server that accepts only bearer tokens, like
Microsoft 365's and Gmail's: STARTTLS required (test certificate), then AUTH XOAUTH2 or
OAUTHBEARER with a token that oauth2_server.py issued and that has not expired or been
revoked.  Debian's python3-aiosmtpd hosts the custom mechanisms.  Loopback only.

  --state DIR     oauth2_server.py's state directory: "tokens" lists the valid tokens;
                  "revoked" (one token per line, or "*" for all issued so far) makes them
                  fail with 535, as after a password reset
  --user MAILBOX  the mailbox the token must be presented for (user= / a=)
  --out DIR       each accepted message is written to DIR/N.eml, with an X-Auth: header
  --log FILE      one line per AUTH: mechanism, user, verdict (never the token)
Failures follow Google's XOAUTH2 dialogue: 334 with a base64 JSON error, the client's empty
line, then 535 5.7.3.  Stop it by its pid.
"""
import argparse
import asyncio
import base64
import json
import os
import ssl
import time

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult

ARGS = None
COUNT = 0


def log(line):
    with open(ARGS.log, "a") as f:
        f.write(line + "\n")


def token_verdict(token):
    try:
        with open(os.path.join(ARGS.state, "revoked")) as f:
            revoked = {l.strip() for l in f if l.strip()}
    except OSError:
        revoked = set()
    try:
        with open(os.path.join(ARGS.state, "tokens")) as f:
            issued = [l.split() for l in f if l.strip()]
    except OSError:
        issued = []
    if "*" in revoked:
        revoked |= {t[0] for t in issued}
    for t in issued:
        if t[0] == token:
            if token in revoked:
                return "revoked"
            if int(t[1]) <= time.time():
                return "expired"
            return "ok"
    return "unknown"


class Handler:
    async def _finish(self, server, mech, user, token):
        verdict = "no token" if token is None else token_verdict(token)
        if verdict == "ok" and user != ARGS.user:
            verdict = "wrong user %r" % user
        log("AUTH %s user=%s verdict=%s" % (mech, user, verdict))
        if verdict == "ok":
            return AuthResult(success=True, auth_data=user)
        err = json.dumps({"status": "401", "schemes": "bearer", "scope": "https://mail.google.com/"})
        await server.challenge_auth(err.encode())
        await server.push("535 5.7.3 Authentication unsuccessful (%s)" % verdict)
        return AuthResult(success=False, handled=True)

    async def _initial(self, server, args):
        if len(args) > 1:
            try:
                return base64.b64decode(args[1], validate=True).decode()
            except Exception:  # noqa: BLE001
                return ""
        blob = await server.challenge_auth(b"")
        return blob.decode() if isinstance(blob, bytes) else ""

    async def auth_XOAUTH2(self, server, args):
        text = await self._initial(server, args)
        # user=MAILBOX ^A auth=Bearer TOKEN ^A ^A, exactly.
        user, token = None, None
        if text.endswith("\x01\x01"):
            fields = text[:-2].split("\x01")
            if len(fields) == 2 and fields[0].startswith("user=") and \
                    fields[1].startswith("auth=Bearer "):
                user, token = fields[0][5:], fields[1][12:]
        return await self._finish(server, "XOAUTH2", user, token)

    async def auth_OAUTHBEARER(self, server, args):
        text = await self._initial(server, args)
        user, token = None, None
        # RFC 7628: gs2-header "n,a=USER," ^A kvpairs ^A ^A
        if text.startswith("n,a=") and text.endswith("\x01\x01"):
            gs2, _, rest = text.partition("\x01")
            user = gs2[4:].rstrip(",").replace("=2C", ",").replace("=3D", "=")
            for kv in rest[:-2].split("\x01"):
                if kv.startswith("auth=Bearer "):
                    token = kv[12:]
        return await self._finish(server, "OAUTHBEARER", user, token)

    async def handle_DATA(self, server, session, envelope):
        global COUNT
        COUNT += 1
        path = os.path.join(ARGS.out, "%d.eml" % COUNT)
        with open(path + ".tmp", "wb") as f:
            f.write(b"X-Auth: %s\r\n" % str(session.auth_data).encode())
            f.write(b"X-Envelope-From: %s\r\n" % envelope.mail_from.encode())
            f.write(envelope.original_content)
        os.replace(path + ".tmp", path)
        return "250 2.0.0 OK queued as e2e-%d" % COUNT


class TLSController(Controller):
    def factory(self):
        return SMTP(self.handler, hostname="smtp.e2e.test", tls_context=self.tls,
                    require_starttls=True, auth_required=True, auth_require_tls=True,
                    auth_exclude_mechanism=["PLAIN", "LOGIN"])


def main():
    global ARGS
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--state", required=True)
    ap.add_argument("--user", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--log", required=True)
    ARGS = ap.parse_args()
    os.makedirs(ARGS.out, exist_ok=True)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(ARGS.cert, ARGS.key)
    ctl = TLSController(Handler(), hostname="127.0.0.1", port=ARGS.port)
    ctl.tls = tls
    ctl.start()
    try:
        asyncio.get_event_loop().run_forever()
    except KeyboardInterrupt:
        pass
    finally:
        ctl.stop()


if __name__ == "__main__":
    main()
