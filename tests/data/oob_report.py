"""Out-of-band reports for Epoxi's oob and suppression tests, built with Python's email package
and sent with smtplib, as a receiving MTA or a mailbox provider's feedback loop would.

Usage: python3 oob_report.py PORT KIND RCPT [ORIGINAL_FILE] [KEY=VALUE ...]

KIND:
  dsn      multipart/report; report-type=delivery-status (RFC 3464), from the null sender; the
           original's headers go back as text/rfc822-headers. Keys: final, original, action,
           status, diag, source (client address to connect from, e.g. 127.0.0.2).
  arf      multipart/report; report-type=feedback-report (RFC 5965), the original attached as
           message/rfc822. Keys: type, rcpt_to, mail_from, agent, source.
  garbage  a few messages that are no report (plain text, a broken multipart/report, random
           bytes), each in its own transaction.

Prints one JSON line per transaction: {"code": N, "text": "..."} for the reply to the data.
"""
import email
import email.policy
import json
import random
import smtplib
import sys
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.message import MIMEMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText


def send(port, source, sender, rcpt, data):
    kwargs = {"source_address": (source, 0)} if source else {}
    with smtplib.SMTP("127.0.0.1", port, timeout=20, **kwargs) as s:
        s.ehlo("reporter.remote.test")
        code, text = s.mail(sender)
        assert code == 250, (code, text)
        code, text = s.rcpt(rcpt)
        if code != 250:
            print(json.dumps({"code": code, "text": text.decode(), "at": "rcpt"}), flush=True)
            return
        code, text = s.data(data)
        print(json.dumps({"code": code, "text": text.decode()}), flush=True)


def original_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def headers_of(raw):
    # The header block as received: everything before the first blank line.
    end = raw.find(b"\r\n\r\n")
    return raw[: end + 2] if end >= 0 else raw


def dsn(opts, raw):
    msg = MIMEMultipart("report", report_type="delivery-status")
    msg["From"] = "MAILER-DAEMON@mx.remote.test"
    msg["To"] = "bounces"
    msg["Subject"] = "Undelivered Mail Returned to Sender"
    msg.attach(MIMEText("Your message could not be delivered.\n"))
    per_message = Message()
    per_message["Reporting-MTA"] = "dns; mx.remote.test"
    per_rcpt = Message()
    if "original" in opts:
        per_rcpt["Original-Recipient"] = "rfc822; " + opts["original"]
    per_rcpt["Final-Recipient"] = "rfc822; " + opts["final"]
    per_rcpt["Action"] = opts.get("action", "failed")
    per_rcpt["Status"] = opts.get("status", "5.1.1")
    per_rcpt["Remote-MTA"] = "dns; mailstore.remote.test"
    per_rcpt["Diagnostic-Code"] = "smtp; " + opts.get(
        "diag", "550 5.1.1 User unknown in local recipient table"
    )
    status = MIMEBase("message", "delivery-status")
    del status["MIME-Version"]
    status.set_payload([per_message, per_rcpt])
    msg.attach(status)
    headers = MIMEBase("text", "rfc822-headers")
    del headers["MIME-Version"]
    headers.set_payload(headers_of(raw).decode("ascii", "replace"))
    msg.attach(headers)
    return msg.as_bytes(policy=email.policy.SMTP)


def arf(opts, raw):
    msg = MIMEMultipart("report", report_type="feedback-report")
    msg["From"] = "fbl@isp.remote.test"
    msg["To"] = "abuse"
    msg["Subject"] = "Abuse report"
    msg.attach(MIMEText("This is an email abuse report.\n"))
    fields = [
        ("Feedback-Type", opts.get("type", "abuse")),
        ("User-Agent", opts.get("agent", "TestFBL/1.0")),
        ("Version", "1"),
        ("Original-Mail-From", "<" + opts.get("mail_from", "sender@client.test") + ">"),
        ("Original-Rcpt-To", "<" + opts["rcpt_to"] + ">"),
        ("Source-IP", "127.0.0.1"),
        ("Reported-Domain", "client.test"),
    ]
    report = MIMEBase("message", "feedback-report")
    del report["MIME-Version"]
    report.set_payload("".join(f"{k}: {v}\r\n" for k, v in fields))
    msg.attach(report)
    original = email.message_from_bytes(raw, policy=email.policy.compat32)
    msg.attach(MIMEMessage(original))
    return msg.as_bytes(policy=email.policy.SMTP)


def garbage():
    rng = random.Random(7)
    yield b"Subject: hello\r\n\r\nJust a note, not a report.\r\n"
    yield (
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=zz\r\n\r\n"
        b"--zz\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: x\r\n"
    )
    yield (
        b"Content-Type: multipart/report; report-type=feedback-report; boundary=\"\r\n\r\n"
        b"--\r\n--\r\n"
    )
    yield bytes(rng.randrange(1, 256) for _ in range(4000)).replace(b"\r", b"").replace(
        b"\n", b"\r\n"
    )


def main():
    port, kind, rcpt = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    rest = sys.argv[4:]
    path = rest.pop(0) if rest and "=" not in rest[0] else None
    opts = dict(a.split("=", 1) for a in rest)
    source = opts.get("source")
    if kind == "dsn":
        send(port, source, "", rcpt, dsn(opts, original_bytes(path)))
    elif kind == "arf":
        send(port, source, "fbl@isp.remote.test", rcpt, arf(opts, original_bytes(path)))
    elif kind == "garbage":
        for data in garbage():
            send(port, source, "", rcpt, data)
    else:
        sys.exit(f"unknown kind {kind}")


if __name__ == "__main__":
    main()
