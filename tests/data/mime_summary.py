"""What a receiver sees in each message aiosmtpd stored (DIR/<n>.eml), parsed with Python's
`email` package: prints one JSON object per message, in a JSON list.

Usage: python3 mime_summary.py DIR
"""
import base64
import email
import email.policy
import json
import os
import sys


def summary(raw, envelope):
    m = email.message_from_bytes(raw, policy=email.policy.default)
    text = m.get_body(preferencelist=("plain",))
    html = m.get_body(preferencelist=("html",))
    attachments = []
    for part in m.iter_attachments():
        attachments.append({
            "file_name": part.get_filename(),
            "content_type": part.get_content_type(),
            "content_id": part.get("Content-ID"),
            "data_b64": base64.b64encode(part.get_content() if isinstance(part.get_content(), bytes)
                                         else part.get_content().encode()).decode(),
        })
    parts = [p.get_content_type() for p in m.walk()]
    return {
        "rcpt": envelope[1] if len(envelope) > 1 else "",
        "sender": envelope[0] if envelope else "",
        "first_line": raw.split(b"\r\n", 1)[0].decode("utf-8", "replace"),
        "received": str(m.get("Received", "")),
        "subject": str(m.get("Subject", "")),
        "from": str(m.get("From", "")),
        "to": str(m.get("To", "")),
        "reply_to": str(m.get("Reply-To", "")),
        "message_id": str(m.get("Message-ID", "")),
        "message_ids": len(m.get_all("Message-ID", [])),
        "date": str(m.get("Date", "")),
        "x_custom": str(m.get("X-Custom", "")),
        "content_type": m.get_content_type(),
        "parts": parts,
        "text": text.get_content() if text is not None else None,
        "html": html.get_content() if html is not None else None,
        "attachments": attachments,
        "defects": [str(d) for p in m.walk() for d in p.defects],
    }


def main():
    directory = sys.argv[1]
    out = []
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".eml"):
            continue
        base = os.path.join(directory, name[:-4])
        with open(base + ".eml", "rb") as f:
            raw = f.read()
        with open(base + ".env", encoding="utf-8") as f:
            envelope = f.read().split("\n")
        out.append(summary(raw, envelope))
    json.dump(out, sys.stdout)


main()
