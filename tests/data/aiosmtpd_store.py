"""A downstream SMTP server for Epoxi's content-fidelity tests: aiosmtpd, storing every message
byte for byte (as received, after dot-unstuffing) in DIR/<n>.eml, with its envelope in
DIR/<n>.env and the parameters of its MAIL command (SIZE=...) in DIR/<n>.opts. Prints "listening on PORT" once ready and runs until killed.

Usage: python3 aiosmtpd_store.py PORT DIR
"""
import asyncio
import os
import sys

from aiosmtpd.controller import Controller


class Store:
    def __init__(self, directory):
        self.directory = directory
        self.count = 0

    async def handle_DATA(self, server, session, envelope):
        self.count += 1
        base = os.path.join(self.directory, str(self.count))
        with open(base + ".eml.tmp", "wb") as f:
            f.write(envelope.original_content)
        with open(base + ".env", "w", encoding="utf-8") as f:
            f.write(envelope.mail_from + "\n" + "\n".join(envelope.rcpt_tos) + "\n")
        with open(base + ".opts", "w", encoding="utf-8") as f:
            f.write(" ".join(envelope.mail_options) + "\n")
        os.rename(base + ".eml.tmp", base + ".eml")
        return "250 2.0.0 stored"


def main():
    port, directory = int(sys.argv[1]), sys.argv[2]
    os.makedirs(directory, exist_ok=True)
    controller = Controller(
        Store(directory),
        hostname="127.0.0.1",
        port=port,
        enable_SMTPUTF8=True,
        decode_data=False,
        data_size_limit=64 * 1024 * 1024,
    )
    controller.start()
    print(f"listening on {port}", flush=True)
    try:
        asyncio.get_event_loop().run_forever()
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
