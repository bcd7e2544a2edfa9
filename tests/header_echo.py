"""A backend for the tracing lab test: answers every request with 200 and a JSON body holding the
request's header fields (lower-case names), so the test sees exactly what the proxy sent upstream.
A path `/sleep/<ms>` answers after that many milliseconds (at most 10 s).

Run inside a lab pod: ``python -m tests.header_echo HOST PORT``.
"""

from __future__ import annotations

import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HeaderEcho(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path.startswith("/sleep/"):
            time.sleep(min(int(self.path.split("/")[2]), 10_000) / 1000)
        fields: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            fields[key] = f"{fields[key]}, {value}" if key in fields else value
        body = json.dumps(fields).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    server = ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), HeaderEcho)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
