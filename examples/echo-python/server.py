"""An echo app for hangar, using only the Python standard library.

It listens on $PORT. /health answers 503 until a simulated setup (loading a model,
say) has taken SETUP_SECONDS, then 200. Every other request is answered with a JSON
description of itself: method, path, body (raw, and parsed as "json" when it is JSON)
and the runner's identity.

A JSON body with a numeric "sleep" (seconds) makes the request work that long, printing
progress, unless it is cancelled meanwhile: a POST to any path ending in /cancel cancels
the request whose id it carries, and the working request then answers 499. Request ids
come from the x-fal-request-id header, else x-hangar-request-id.
"""

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SETUP_SECONDS = float(os.environ.get("SETUP_SECONDS", "2"))
STEP_SECONDS = 0.05
ready = threading.Event()
cancelled = set()  # request ids; adding and testing are atomic under the GIL


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

    def _request_id(self):
        return self.headers.get("x-fal-request-id") or self.headers.get("x-hangar-request-id")

    def _handle(self):
        if self.path == "/health":
            if ready.is_set():
                self._send(200, {"status": "ok"})
            else:
                self._send(503, {"status": "setting up"})
            return
        request_id = self._request_id()
        print(f"handling {self.command} {self.path} {request_id or '-'}", flush=True)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8", "replace") if length else ""

        if self.command == "POST" and self.path.endswith("/cancel"):
            if not request_id:
                self._send(400, {"detail": "no x-fal-request-id or x-hangar-request-id header"})
                return
            cancelled.add(request_id)
            print(f"cancel requested for {request_id}", flush=True)
            self._send(200, {"cancelled": request_id})
            return

        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        sleep = parsed.get("sleep") if isinstance(parsed, dict) else None
        if isinstance(sleep, (int, float)) and not isinstance(sleep, bool):
            if not work(sleep, request_id):
                print(f"cancelled {request_id}", flush=True)
                self._send(499, {"detail": "cancelled", "error_type": "request_cancelled"})
                return

        self._send(200, {
            "method": self.command,
            "path": self.path,
            "body": body,
            "json": parsed,
            "app": os.environ.get("HANGAR_APP"),
            "revision": os.environ.get("HANGAR_REVISION"),
            "runner": os.environ.get("HANGAR_RUNNER_ID"),
        })

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

    def log_message(self, fmt, *args):
        print("%s %s" % (self.address_string(), fmt % args), flush=True)


def work(seconds, request_id):
    """Sleeps `seconds` in short steps, printing progress about every half second;
    returns False as soon as the request has been cancelled."""
    deadline = time.monotonic() + seconds
    steps = 0
    while time.monotonic() < deadline:
        if request_id in cancelled:
            return False
        time.sleep(min(STEP_SECONDS, max(0.0, deadline - time.monotonic())))
        steps += 1
        if steps % 10 == 0:
            print(f"step {steps // 10}", flush=True)
    return True


def main():
    threading.Thread(target=setup, daemon=True).start()
    port = int(os.environ.get("PORT", "8000"))
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"echo listening on 127.0.0.1:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
