"""A small real OpenAI-compatible chat server on 127.0.0.1 whose behaviour a test picks
(`mode`: ok, flaky, slow, 500, 401, malformed); it records every request."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Server:
    """A real OpenAI-compatible stand-in on 127.0.0.1 whose behaviour each test picks."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                server.requests.append(json.loads(self.rfile.read(length)))
                server.headers.append(dict(self.headers))
                mode = server.mode
                if mode == "flaky" and len(server.requests) == 1:
                    mode = "500"
                if mode == "slow":
                    time.sleep(1.0)
                if mode == "500":
                    self.send_response(500)
                    self.end_headers()
                    return
                if mode == "401":
                    self.send_response(401)
                    self.end_headers()
                    return
                body = (
                    b"{not json"
                    if mode == "malformed"
                    else json.dumps(
                        {
                            "choices": [
                                {"message": {"role": "assistant", "content": " A fox trots. "}}
                            ]
                        }
                    ).encode()
                )
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                with contextlib.suppress(OSError):  # the client may have timed out
                    self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
