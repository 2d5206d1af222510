"""POST a file's bytes to an URL as JSON with Python's urllib, the way a sender's client does.
Prints the status on the first line and the response body after it.

Usage: python3 http_post.py URL BODY_FILE [TOKEN]
"""
import sys
import urllib.error
import urllib.request


def main():
    url, body_file = sys.argv[1], sys.argv[2]
    token = sys.argv[3] if len(sys.argv) > 3 else ""
    with open(body_file, "rb") as f:
        body = f.read()
    req = urllib.request.Request(url, data=body, method="POST")
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, text = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read()
    sys.stdout.write(str(status) + "\n")
    sys.stdout.write(text.decode("utf-8", "replace"))


main()
