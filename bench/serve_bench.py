"""--mode serve under load: requests/s, latency percentiles, errors and memory, LiteRT against Keras.

    python bench/serve_bench.py --model models/cnn_model.keras --image some.jpg [--clients 8] [--seconds 20]

For each runtime (LiteRT: the model with its verified .tflite copy; Keras: the same
model file alone in a temporary folder), in the same run: starts the server on
127.0.0.1 in a fresh process, warms it up, then ``--clients`` threads send
single-image TensorFlow Serving predict requests over keep-alive connections for
``--seconds``; prints requests/s, p50/p95/p99 latency and errors; then keeps sending
until ``--total`` requests in all and prints the server's RSS before and after.
First, the LiteRT interpreter alone: milliseconds per call at batch sizes 1 to 8, which
decide whether serve batches concurrent requests on LiteRT (``serve.Model``).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SRC = Path(__file__).resolve().parents[1] / "src"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    def __init__(self, model: Path):
        env_code = f"import sys; sys.path.insert(0, {str(SRC)!r}); from simple_cnn.cli import main; sys.exit(main(sys.argv[1:]))"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", env_code, "--mode", "serve", "--model_file_path", str(model), "--port", "0", "--quiet"],
            stderr=subprocess.PIPE,
            text=True,
        )
        # --quiet: no per-request log lines (they would measure the terminal); the URL line is
        # an info line, so find the port from the socket table instead.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            port = self._listening_port()
            if port:
                self.host, self.port = "127.0.0.1", port
                return
            time.sleep(0.2)
        raise RuntimeError("the server did not start")

    def _listening_port(self) -> int | None:
        out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
        match = re.search(rf"127\.0\.0\.1:(\d+)\s.*pid={self.proc.pid},", out)
        return int(match.group(1)) if match else None

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def client(server: Server, body: bytes, path: str, stop_at, latencies: list, errors: list, budget: list) -> None:
    connection = http.client.HTTPConnection(server.host, server.port, timeout=30)
    connection.connect()
    connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle delay between head and body
    while time.monotonic() < stop_at() and budget[0] > 0:
        budget[0] -= 1
        start = time.perf_counter()
        try:
            connection.request("POST", path, body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                errors.append(response.status)
        except OSError as e:
            errors.append(repr(e))
            connection.close()
            connection = http.client.HTTPConnection(server.host, server.port, timeout=30)
        latencies.append(time.perf_counter() - start)
    connection.close()


def load(server: Server, body: bytes, path: str, clients: int, seconds: float, total: int) -> dict:
    latencies, errors, budget = [], [], [total]
    end = time.monotonic() + seconds
    threads = [
        threading.Thread(target=client, args=(server, body, path, lambda: end, latencies, errors, budget)) for _ in range(clients)
    ]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    ms = np.array(latencies or [0.0]) * 1000
    return {
        "requests": len(latencies),
        "requests_per_second": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "errors": len(errors),
    }


def interpreter_times(model: Path, repeats: int = 50) -> str:
    """Milliseconds per LiteRT call at batch sizes 1, 2, 4 and 8, the model's own interpreter settings."""
    sys.path.insert(0, str(SRC))
    from simple_cnn.formats import tflite_path
    from simple_cnn.runtime import LiteRT

    interpreter = LiteRT(tflite_path(model).read_bytes())
    parts = []
    for n in (1, 2, 4, 8):
        x = np.zeros((n, *interpreter.input_shape), np.uint8)
        interpreter(x)  # sizes the interpreter's tensors for n
        start = time.perf_counter()
        for _ in range(repeats):
            interpreter(x)
        ms = (time.perf_counter() - start) / repeats * 1000
        parts.append(f"{n}: {ms:.2f} ms ({ms / n:.2f} ms an image)")
    return "LiteRT interpreter alone, batch " + ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--total", type=int, default=10_000, help="requests in all, for the memory check (LiteRT)")
    args = parser.parse_args()
    name = args.model.name.split(".")[0]
    body = json.dumps({"instances": [{"b64": base64.b64encode(args.image.read_bytes()).decode()}]}).encode()
    path = f"/v1/models/{name}:predict"
    print(interpreter_times(args.model), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        alone = Path(tmp) / args.model.name  # without its .tflite copy: the Keras runtime
        shutil.copyfile(args.model, alone)
        for runtime, model in (("litert", args.model), ("keras", alone)):
            server = Server(model)
            try:
                load(server, body, path, 2, 3, 200)  # warm-up
                rss_start = rss_mb(server.proc.pid)
                timed = load(server, body, path, args.clients, args.seconds, 10**9)
                line = (
                    f"{runtime:6s} {args.clients} clients, {args.seconds:g} s: {timed['requests_per_second']:.0f} requests/s, "
                    f"p50 {timed['p50_ms']:.1f} ms, p95 {timed['p95_ms']:.1f} ms, p99 {timed['p99_ms']:.1f} ms, "
                    f"{timed['errors']} errors"
                )
                if runtime == "litert":
                    rest = load(server, body, path, args.clients, 3600, max(0, args.total - timed["requests"] - 200))
                    done = timed["requests"] + rest["requests"] + 200
                    line += f"; RSS {rss_start:.0f} MB after warm-up, {rss_mb(server.proc.pid):.0f} MB after {done:,} requests"
                print(line, flush=True)
            finally:
                code = server.stop()
                if code != 0:
                    print(f"  the server exited with {code} on SIGTERM")


if __name__ == "__main__":
    main()
