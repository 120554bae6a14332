"""``kdsearch ui``: the MLflow UI over the store a search wrote, on 127.0.0.1, until Ctrl-C.

``mlflow server`` runs as a child process in its own process group, so stopping it stops
everything it started (uvicorn and its workers). It is started with

- ``--workers 1``: one local user needs no pool, and it starts in seconds on a small machine;
- ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`` (unless set by the user): the GenAI job runners
  (huey consumers) are not needed to browse runs and outlive the server when it is stopped.

The printed link opens the latest search's experiment in the classic runs view: MLflow 3
opens in its GenAI view otherwise. The server's own output is kept out of sight (it goes to
a log whose last line explains a failed start) unless ``kdsearch -v ui``.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any, Optional

from kdsearch.spaces.errors import UserError

__all__ = ["cmd_ui", "latest_search_experiment", "port_free", "require_store", "server_command", "wait_until_up"]

HOST = "127.0.0.1"
#: how long the server may take to answer /health (a loaded 2-core machine needs ~20 s)
START_TIMEOUT_S = 180.0
#: how long it may take to stop after SIGTERM before it is killed
STOP_TIMEOUT_S = 20.0


def require_store(tracking_uri: str) -> str:
    """``tracking_uri``, refused when it names a sqlite file that does not exist: opening it
    would create an empty store (in the current folder, for the default URI) and every
    command would then report that nothing was logged there, hiding the real mistake."""
    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix):
        path = tracking_uri[len(prefix):].split("?", 1)[0]
        if path and path != ":memory:" and not Path(path).is_file():
            raise UserError(f"--tracking-uri {tracking_uri}: no such database ({Path(path).resolve()}); fix: run from the "
                            "folder of the search or pass its store, e.g. --tracking-uri sqlite:////abs/path/mlflow.db")
    return tracking_uri


def port_free(port: int, host: str = HOST) -> bool:
    """Whether a server could listen on ``host:port`` now (``SO_REUSEADDR`` like uvicorn, so a
    port in TIME_WAIT counts as free and only a live listener as taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def latest_search_experiment(c: Any) -> Optional[str]:
    """The experiment id of the most recent search (parent run) in the store, if any."""
    from kdsearch.search.tracking import ROLE_TAG

    experiments = [e.experiment_id for e in c.search_experiments(max_results=1000)]
    if not experiments:
        return None
    runs = c.search_runs(experiments, filter_string=f"tags.`{ROLE_TAG}` = 'search'",
                         order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.experiment_id if runs else None


def server_command(tracking_uri: str, port: int) -> list[str]:
    """``mlflow server`` over ``tracking_uri`` on loopback, run by this interpreter's MLflow."""
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri, "--host", HOST,
            "--port", str(port), "--workers", "1"]


def wait_until_up(proc: subprocess.Popen, url: str, timeout_s: float = START_TIMEOUT_S) -> bool:
    """Poll ``url`` until it answers 200 (True) or the server exits (False); raise on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise UserError(f"the MLflow server did not answer {url} within {timeout_s:.0f} s; "
                    "fix: run `kdsearch -v ui` to see its output")


def stop(proc: subprocess.Popen) -> int:
    """Stop the server's whole process group: SIGTERM (uvicorn shuts down cleanly), then SIGKILL."""
    if proc.poll() is None:
        for sig, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
    try:  # workers left behind by a server that exited on its own
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return proc.returncode if proc.returncode is not None else -9


def _last_line(log: Optional[IO[bytes]]) -> str:
    if log is None:
        return "see its output above"
    log.flush()
    lines = [ln.strip() for ln in Path(log.name).read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "no output"


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def cmd_ui(args: argparse.Namespace) -> int:
    """Start the UI, print its link, wait for Ctrl-C (or SIGTERM), stop the server."""
    from kdsearch.search.tracking import client, ui_link

    port, uri, verbose = args.port, args.tracking_uri, bool(getattr(args, "verbose", False))
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port}: not a TCP port; fix: pass a number from 1024 to 65535")
    if uri.startswith(("http://", "https://")):
        c = client(uri)  # a server already: its own UI is the one to open
        exp = latest_search_experiment(c)
        print(ui_link(uri, exp) if exp else uri, flush=True)
        print(f"kdsearch: {uri} is an MLflow server already; open the link above", file=sys.stderr)
        return 0
    if not port_free(port):
        raise UserError(f"--port {port}: {HOST}:{port} is already in use; fix: pass a free port, e.g. --port {port + 1}")
    exp = latest_search_experiment(client(require_store(uri)))  # the store opens (and is migrated once)

    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    if not verbose:
        env.setdefault("PYTHONWARNINGS", "ignore")
    base = f"http://{HOST}:{port}"
    with tempfile.NamedTemporaryFile(prefix="kdsearch-ui-", suffix=".log", delete=True) as log_file:
        log = None if verbose else log_file
        proc = subprocess.Popen(server_command(uri, port), env=env, stdin=subprocess.DEVNULL,
                                stdout=log if log else None, stderr=subprocess.STDOUT if log else None,
                                start_new_session=True)
        # both stop the server; set SIGINT too, since a background job may start with it ignored
        previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            print(f"starting the MLflow UI over {uri} ...", file=sys.stderr, flush=True)
            if not wait_until_up(proc, f"{base}/health"):
                raise UserError(f"the MLflow server exited with code {proc.returncode} ({_last_line(log)}); "
                                "fix: check --tracking-uri, or run `kdsearch -v ui` to see its output")
            print(ui_link(base, exp) if exp else f"{base}/#/experiments", flush=True)
            print("MLflow UI running; press Ctrl-C to stop", file=sys.stderr, flush=True)
            code = proc.wait()
            raise UserError(f"the MLflow server stopped by itself with code {code} ({_last_line(log)}); "
                            "fix: run `kdsearch -v ui` to see its output")
        except KeyboardInterrupt:
            print("stopping the MLflow UI...", file=sys.stderr, flush=True)
            return 0
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            stop(proc)
