"""An echo app for hangar, using only the Python standard library.

It listens on $PORT. /health answers 503 until a simulated setup (loading a model,
say) has taken SETUP_SECONDS, then 200. Every other request is answered with a JSON
description of itself: method, path, body and the runner's identity.
"""

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SETUP_SECONDS = float(os.environ.get("SETUP_SECONDS", "2"))
ready = threading.Event()


def setup():
    time.sleep(SETUP_SECONDS)  # stands in for loading weights
    ready.set()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self):
        if self.path == "/health":
            if ready.is_set():
                self._send(200, {"status": "ok"})
            else:
                self._send(503, {"status": "setting up"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
        self._send(200, {
            "method": self.command,
            "path": self.path,
            "body": body,
            "app": os.environ.get("HANGAR_APP"),
            "revision": os.environ.get("HANGAR_REVISION"),
            "runner": os.environ.get("HANGAR_RUNNER_ID"),
        })

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

    def log_message(self, fmt, *args):
        print("%s %s" % (self.address_string(), fmt % args), flush=True)


def main():
    threading.Thread(target=setup, daemon=True).start()
    port = int(os.environ.get("PORT", "8000"))
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"echo listening on 127.0.0.1:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
