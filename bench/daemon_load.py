"""`status` latency and throughput against a real `wangend serve`, idle and while a job
generates. Starts its own daemon (tiny model) in a temporary state dir; prints figures,
asserts nothing.

    .venv/bin/python bench/daemon_load.py
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from control_plane import round_trips, throughput


def start(root: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "wangend.cli",
            "serve",
            "--state-dir",
            str(root / "s"),
            "--output-dir",
            str(root / "o"),
            "--port",
            "0",
            "--log-level",
            "warning",
        ],
    )
    for _ in range(600):
        if (root / "s" / "endpoint.json").exists():
            return proc
        time.sleep(0.05)
    raise RuntimeError("daemon did not start")


def call(path: str, method: str, params: dict | None = None) -> dict:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        msg = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}}
        s.sendall(json.dumps(msg).encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            buf += s.recv(65536)
        return json.loads(buf.split(b"\n")[0])


def figures(label: str, url: str, token: str | None) -> None:
    rt = sorted(round_trips(url, token, 3000))
    p50, p99 = rt[len(rt) // 2] * 1000, rt[int(len(rt) * 0.99)] * 1000
    rate = asyncio.run(throughput(url, token, 20, 3.0))
    print(f"{label:<44} p50 {p50:.3f} ms  p99 {p99:.3f} ms  20 clients {rate:,.0f} req/s")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        proc = start(root)
        try:
            endpoint = json.loads((root / "s" / "endpoint.json").read_text())
            token = (root / "s" / "token").read_text().strip()
            tcp = f"tcp://127.0.0.1:{endpoint['tcp'][1]}"
            unix = f"unix://{endpoint['unix']}"
            sock = endpoint["unix"]
            figures("idle, TCP + token", tcp, token)
            figures("idle, Unix socket", unix, None)
            # Warm the model, then keep a long job generating while we measure.
            call(sock, "enqueue", {"prompt": "warm", "steps": 2})
            while call(sock, "status")["result"]["queue"]["succeeded"] < 1:
                time.sleep(0.1)
            job = call(
                sock,
                "enqueue",
                {"prompt": "load", "steps": 500, "width": 256, "height": 256, "frames": 33},
            )["result"]["job"]
            while call(sock, "status")["result"]["running"] is None:
                time.sleep(0.05)
            figures("while a job generates, TCP + token", tcp, token)
            figures("while a job generates, Unix socket", unix, None)
            steps = call(sock, "status", {"job": job})["result"]["progress"]
            print(f"(the job was at step {steps['step']} of {steps['steps']} and kept running)")
            call(sock, "abort", {"job": job})
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
