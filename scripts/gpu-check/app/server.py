"""The app scripts/gpu-check.sh deploys: a small torch model (a two-layer MLP) on the
runner's GPU, served with the standard library's HTTP server.

It listens on $PORT on 127.0.0.1 and loads the model before it listens, so that it is
healthy only once the model has answered a first call on the GPU.
  GET  /health   200 {"status": "ok", "device": ...}
  POST /         {"x": [up to 1024 floats]} -> {"y": [the first 4 outputs], "norm": ..., "device": ...}
  GET  /whoami   what the process sees: torch.cuda.device_count(), the first device's
                 UUID (as NVML writes it: GPU-xxxxxxxx-xxxx-...), CUDA_VISIBLE_DEVICES and
                 the /dev/nvidia* nodes

`python server.py --whoami` prints that JSON and exits: what a command run in the runner
by `hangar runners exec` sees.

CUDA is required: without it the app exits with the reason. GPU_CHECK_ALLOW_CPU=1 (off by
default; for testing the script on a machine without a GPU) runs the model on the CPU
instead, with torch where it is installed or else in plain Python, and /whoami then
reports the first id of CUDA_VISIBLE_DEVICES as its GPU's UUID ("fake": true).
"""

import json
import os
import random
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DIM = 1024  # input and output width
HIDDEN = 4096
ALLOW_CPU = os.environ.get("GPU_CHECK_ALLOW_CPU", "0") == "1"


def uuid_string(props):
    """The device's UUID as NVML writes it (GPU-8-4-4-4-12 hex digits), from torch's
    device properties; None where this torch does not give it."""
    uuid = getattr(props, "uuid", None)
    if uuid is None:
        return None
    raw = getattr(uuid, "bytes", None)
    if raw is not None:
        digits = bytes(b & 0xFF for b in (raw.encode("latin-1") if isinstance(raw, str) else raw)).hex()
    else:
        text = str(uuid).strip().lower()
        if text.startswith(("gpu-", "mig-")):
            return text[:3].upper() + text[3:]
        digits = "".join(c for c in text if c in "0123456789abcdef")
    if len(digits) != 32:
        return str(uuid)
    return "GPU-{}-{}-{}-{}-{}".format(digits[:8], digits[8:12], digits[12:16], digits[16:20], digits[20:])


class TorchModel:
    def __init__(self, torch, device):
        self.torch = torch
        self.device = device
        generator = torch.Generator().manual_seed(0)
        layers = [
            torch.nn.Linear(DIM, HIDDEN),
            torch.nn.GELU(),
            torch.nn.Linear(HIDDEN, DIM),
        ]
        for layer in layers:
            for p in layer.parameters():
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        self.net = torch.nn.Sequential(*layers).to(device).eval()

    def __call__(self, x):
        torch = self.torch
        with torch.inference_mode():
            t = torch.zeros(1, DIM, device=self.device)
            if x:
                t[0, : len(x)] = torch.tensor(x, dtype=torch.float32, device=self.device)
            y = self.net(t)[0]
            first = y[:4].tolist()  # waits for the GPU
            norm = float(y.norm())
        return first, norm


class PlainModel:
    """The same shape of work in plain Python, much smaller: GPU_CHECK_ALLOW_CPU=1 where
    torch is missing."""

    device = "cpu (plain Python)"

    def __init__(self):
        rng = random.Random(0)
        self.w = [[rng.gauss(0, 0.02) for _ in range(64)] for _ in range(64)]

    def __call__(self, x):
        x = (list(x) + [0.0] * 64)[:64]
        y = [sum(a * b for a, b in zip(row, x)) for row in self.w]
        return y[:4], sum(v * v for v in y) ** 0.5


def load():
    """The model on the first visible GPU, and what the process sees."""
    try:
        import torch
    except ImportError as e:
        if not ALLOW_CPU:
            sys.exit(f"gpu-check app: cannot import torch ({e}); sys.path = {sys.path}")
        return PlainModel(), fake_whoami(None)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        model = TorchModel(torch, "cuda:0")
        whoami = {
            "device_count": torch.cuda.device_count(),
            "uuid": uuid_string(props),
            "name": props.name,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "fake": False,
        }
    elif ALLOW_CPU:
        model = TorchModel(torch, "cpu")
        whoami = fake_whoami(torch)
    else:
        sys.exit(
            f"gpu-check app: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, "
            f"/dev: {nvidia_nodes()}"
        )
    model([1.0])  # the first call: CUDA's kernels and the allocator set up
    return model, whoami


def fake_whoami(torch):
    """GPU_CHECK_ALLOW_CPU=1 without CUDA: the GPU hangar gave, as if torch had seen it."""
    ids = [i for i in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if i]
    return {
        "device_count": len(ids),
        "uuid": ids[0] if ids else None,
        "name": "none (GPU_CHECK_ALLOW_CPU=1)",
        "torch": torch.__version__ if torch else None,
        "cuda": None,
        "fake": True,
    }


def nvidia_nodes():
    try:
        return sorted(n for n in os.listdir("/dev") if n.startswith("nvidia"))
    except OSError as e:
        return [f"cannot list /dev: {e}"]


def sees(whoami):
    """`whoami` with what this process sees of its environment."""
    return dict(
        whoami,
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        dev=nvidia_nodes(),
        pid=os.getpid(),
        uid=os.getuid(),
    )


def main():
    started = time.monotonic()
    model, whoami = load()
    loaded_s = time.monotonic() - started
    if sys.argv[1:] == ["--whoami"]:
        print(json.dumps(sees(whoami)))
        return
    device = getattr(model, "device", "?")
    print(f"gpu-check app: model on {device} in {loaded_s:.2f}s: {whoami}", flush=True)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, status, payload):
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _route(self):
            return self.path.split("?", 1)[0]

        def do_GET(self):
            route = self._route()
            if route == "/health":
                self._send(200, {"status": "ok", "device": str(device), "load_seconds": round(loaded_s, 3)})
            elif route == "/whoami":
                self._send(200, dict(sees(whoami), device=str(device), load_seconds=round(loaded_s, 3)))
            else:
                self._send(404, {"detail": "GET /health, GET /whoami or POST / with {\"x\": [...]}"})

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            if self._route() not in ("/", "/health"):
                self._send(404, {"detail": "POST / with {\"x\": [...]}"})
                return
            try:
                x = json.loads(body or b"{}").get("x", [])
                x = [float(v) for v in x][:DIM]
            except (ValueError, TypeError, AttributeError):
                self._send(422, {"detail": 'expected a JSON body {"x": [numbers, ...]}'})
                return
            y, norm = model(x)
            self._send(200, {"y": y, "norm": norm, "device": str(device)})

        def log_message(self, fmt, *args):
            pass  # quiet: thousands of calls a second

    port = int(os.environ.get("PORT", "8000"))
    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128  # 16 connections at once, and more

    server = Server(("127.0.0.1", port), Handler)
    print(f"gpu-check app listening on 127.0.0.1:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
