"""`imgrec serve` under load: latency, throughput, errors and the server's memory over 2,000 requests.

Trains a quick LeNet on Fashion-MNIST (1 epoch on 10,000 images, as `imgrec train` does; speed does not depend on
accuracy), or takes --run, starts `imgrec serve` on it in a subprocess on a free loopback port, and sends
--requests POST /api/predict requests, --concurrency at a time, from an httpx2 async client, each a real
Fashion-MNIST test image as a 28x28 PNG (the first 1,000 test images, in turn; --side enlarges them). Reports errors (anything but
200 with a label), latency percentiles (from sending the request to reading the whole answer), requests/s, how
many answers were right, and the server's resident memory (VmRSS from /proc) when ready, after 50 warm-up
requests (start), half-way (middle) and at the end.

    python benchmarks/serve_load.py --data-dir ../shared/data --json serve-load.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx
import numpy as np
from PIL import Image

FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
WARM_UP = 50


def quick_run(data_dir: str, project: Path, threads: int) -> Path:
    """A LeNet trained for one epoch on 10,000 Fashion-MNIST images, by the command line."""
    subprocess.run([sys.executable, "-m", "imgrec", "train", "--data", "fashion-mnist", "--data-dir", data_dir,
                    "--model", "lenet", "--epochs", "1", "--train-samples", "10000", "--threads", str(threads),
                    "--project", str(project), "--name", "serve-load"], check=True, stdout=subprocess.DEVNULL)
    return project / "serve-load"


def fashion_pngs(data_dir: str, n: int = 1000, side: int = 28) -> list[tuple[bytes, str]]:
    """The first n Fashion-MNIST test images as PNG bytes (enlarged to side x side), with their class names."""
    raw = Path(data_dir) / "FashionMNIST" / "raw"
    images = np.frombuffer((raw / "t10k-images-idx3-ubyte").read_bytes(), np.uint8, offset=16).reshape(-1, 28, 28)
    labels = np.frombuffer((raw / "t10k-labels-idx1-ubyte").read_bytes(), np.uint8, offset=8)
    out = []
    for image, label in zip(images[:n], labels[:n]):
        buffer = io.BytesIO()
        Image.fromarray(image).resize((side, side), Image.Resampling.BICUBIC).save(buffer, format="PNG")
        out.append((buffer.getvalue(), FASHION[label]))
    return out


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (VmRSS in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def start_server(run: Path, workers_threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    """`imgrec serve` on a free port; returns the process and its URL once /healthz answers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "imgrec", "serve", str(run), "--port", str(port),
                             "--threads", str(workers_threads), "--device", "cpu"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"imgrec serve exited:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)


async def load(url: str, pngs: list[tuple[bytes, str]], requests: int, concurrency: int, pid: int) -> dict[str, Any]:
    """Send the requests, `concurrency` in flight; latencies, errors, right answers and the middle RSS."""
    latencies: list[float] = []
    errors: list[str] = []
    right, done, middle = 0, 0, None
    queue = iter(range(requests))

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal right, done, middle
        for i in queue:
            data, truth = pngs[i % len(pngs)]
            started = time.perf_counter()
            try:
                response = await client.post("/api/predict", files={"file": (f"{i}.png", data, "image/png")})
                answer = response.json()
                latencies.append(time.perf_counter() - started)
                if response.status_code != 200 or "label" not in answer:
                    errors.append(f"{response.status_code}: {answer}")
                right += answer.get("label") == truth
            except (httpx.HTTPError, ValueError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            done += 1
            if done == requests // 2:
                middle = rss_mb(pid)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        began = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - began
    return {"latencies": latencies, "errors": errors, "right": right, "seconds": seconds, "rss_middle": middle}


def summarise(result: dict[str, Any], requests: int) -> dict[str, Any]:
    ms = sorted(1000 * s for s in result["latencies"])
    return {"requests": requests, "errors": len(result["errors"]), "first_errors": result["errors"][:5],
            "seconds": round(result["seconds"], 2), "requests_per_second": round(requests / result["seconds"], 1),
            "latency_ms": {"p50": round(statistics.median(ms), 1), "p90": round(ms[int(0.90 * len(ms))], 1),
                           "p99": round(ms[int(0.99 * len(ms))], 1), "max": round(ms[-1], 1)},
            "right": result["right"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data", help="holds FashionMNIST/raw (default: ../shared/data)")
    parser.add_argument("--run", help="serve this run instead of training a quick one")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--workers-threads", type=int, default=1, help="passed to imgrec serve (default: 1, its default)")
    parser.add_argument("--side", type=int, default=28,
                        help="enlarge the test images to this many pixels a side (bigger uploads; default: 28)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else quick_run(args.data_dir, Path(tmp) / "runs", threads=2)
        pngs = fashion_pngs(args.data_dir, side=args.side)
        proc, url = start_server(run, args.workers_threads, Path(tmp) / "serve.log")
        try:
            rss = {"ready": rss_mb(proc.pid)}
            asyncio.run(load(url, pngs, WARM_UP, args.concurrency, proc.pid))
            rss["start"] = rss_mb(proc.pid)
            result = asyncio.run(load(url, pngs, args.requests, args.concurrency, proc.pid))
            rss["middle"], rss["end"] = result["rss_middle"], rss_mb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    report = {**summarise(result, args.requests), "concurrency": args.concurrency, "image_side": args.side,
              "mean_upload_bytes": round(statistics.mean(len(data) for data, _ in pngs)),
              "workers_threads": args.workers_threads, "rss_mb": {k: round(v, 1) for k, v in rss.items()},
              "run": str(run) if args.run else "fashion-mnist lenet, 1 epoch on 10,000 images",
              "machine": {"cpus": os.cpu_count(), "load_average_after": os.getloadavg(),
                          "python": platform.python_version(), "platform": platform.platform()}}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
