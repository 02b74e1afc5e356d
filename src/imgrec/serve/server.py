"""`imgrec serve`: check the options and the optional dependencies, load the model once, run uvicorn.

Binds 127.0.0.1 unless told otherwise, and warns when bound anywhere else: the server has no authentication.
The port is bound before the model is loaded and before the URL is printed, so a busy port is one line, not a
URL and then uvicorn's error.
Torch gets the CPU cores divided among the predictions that may run at once (--threads), so concurrent
requests do not oversubscribe the machine.
"""

from __future__ import annotations

import errno
import importlib
import logging
import math
import socket
from pathlib import Path
from typing import Any

from imgrec.errors import ImgrecError, UsageError
from imgrec.openmp import usable_cpus

log = logging.getLogger(__name__)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
DEPENDENCIES = ("fastapi", "uvicorn", "python_multipart")  # python-multipart: FastAPI's form parser
MAX_CONNECTIONS = 64  # uvicorn answers 503 beyond this many open connections (bounds memory held by uploads)
UPLOAD_MB_RANGE = (0.001, 1024.0)  # an upload is held in memory while it is decoded; no image needs more


def require_dependencies() -> None:
    """Import the web stack or say, in one line, how to install it."""
    for name in DEPENDENCIES:
        try:
            importlib.import_module(name)
        except ImportError:
            raise ImgrecError(f"imgrec serve needs FastAPI, uvicorn and python-multipart ({name} is missing): "
                              f"pip install 'imgrec[serve]'") from None


def check_options(host: str, port: int, max_upload_mb: float, workers_threads: int) -> None:
    """Usage errors for out-of-range options; a warning when the server is reachable beyond this machine."""
    if not host.strip():
        raise UsageError("--host must be an address or a host name (0.0.0.0: all of this machine's), got ''")
    if not 1 <= port <= 65535:
        raise UsageError(f"--port must be in [1, 65535], got {port}")
    check_limits(max_upload_mb, workers_threads)
    if host not in LOCAL_HOSTS:
        log.warning(f"serving on {host}, not 127.0.0.1: anyone who can reach this machine on port {port} can use "
                    f"the model (there is no authentication); use --host 127.0.0.1 to keep it local")


def check_limits(max_upload_mb: float, workers_threads: int) -> None:
    """Usage errors for an upload limit or a worker count out of range (inf and nan included)."""
    low, high = UPLOAD_MB_RANGE
    if not (math.isfinite(max_upload_mb) and low <= max_upload_mb <= high):
        raise UsageError(f"--max-upload-mb must be a number of MB in [{low:g}, {high:g}], got {max_upload_mb:g}")
    if not 1 <= workers_threads <= MAX_CONNECTIONS:
        raise UsageError(f"--threads must be in [1, {MAX_CONNECTIONS}] (the server holds at most "
                         f"{MAX_CONNECTIONS} connections), got {workers_threads}")


def torch_threads(workers_threads: int) -> int:
    """CPU threads per prediction: the cores this process may use, shared by the predictions running at once."""
    return max(1, usable_cpus() // workers_threads)


def build(run: str | Path, max_upload_mb: float = 10, workers_threads: int = 1, device: str = "auto") -> Any:
    """The app for a run folder or weights file (the model loaded once, its card read once)."""
    check_limits(max_upload_mb, workers_threads)
    require_dependencies()
    from imgrec.engine.checkpoint import load_weights_file, resolve_weights, run_dir_of
    from imgrec.inference import Predictor
    from imgrec.serve.app import ServeSettings, create_app
    from imgrec.serve.card import model_card

    path = resolve_weights(run)
    ckpt = load_weights_file(path)
    predictor = Predictor.from_checkpoint(ckpt, source=str(path), device=device)
    settings = ServeSettings(max_upload_bytes=int(max_upload_mb * 2**20), max_concurrent=workers_threads)
    return create_app(predictor, model_card(path, run_dir_of(path), ckpt), settings)


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port and listening, or one line saying why it cannot be (port in use, no right to it,
    not an address of this machine)."""
    sock = None
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)  # the family uvicorn would choose
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart may reuse a port in TIME_WAIT
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        if sock is not None:
            sock.close()
        raise ImgrecError(f"cannot serve on {host}:{port}: {_bind_problem(exc, host)}") from None
    return sock


def _bind_problem(exc: OSError, host: str) -> str:
    if isinstance(exc, socket.gaierror):
        return f"{host!r} is not a host name or address this machine knows ({exc.strerror})"
    reasons = {errno.EADDRINUSE: "the port is already in use (another server?): stop it or choose another --port",
               errno.EACCES: "permission denied (ports below 1024 need administrator rights): choose another --port",
               errno.EADDRNOTAVAIL: f"{host} is not an address of this machine: use 127.0.0.1 or one of its own"}
    return reasons.get(exc.errno or 0, exc.strerror or str(exc))


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = 10,
          workers_threads: int = 1, device: str = "auto") -> None:
    """Bind the port, load the model, then serve the page and the API until Ctrl-C."""
    check_options(host, port, max_upload_mb, workers_threads)
    with listen(host, port) as sock:  # first: a busy port is said at once, not after seconds of loading
        require_dependencies()
        import torch
        import uvicorn

        torch.set_num_threads(torch_threads(workers_threads))
        app = build(run, max_upload_mb, workers_threads, device)
        shown = f"[{host}]" if ":" in host else host
        log.info(f"imgrec serve: http://{shown}:{port}/ (API docs at /docs; Ctrl-C stops)")
        server = uvicorn.Server(uvicorn.Config(app, log_level="info" if log.isEnabledFor(logging.INFO) else "warning", limit_concurrency=MAX_CONNECTIONS,
                                               timeout_keep_alive=5, server_header=False))
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn has shut down gracefully and raised the signal again: a normal stop
            return
    if not server.started:
        raise ImgrecError("the server did not start (uvicorn's message above says why)")
