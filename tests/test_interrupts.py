"""SIGTERM takes Ctrl-C's path: Tune's graceful stop inside a search, exit 143 outside it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from kdsearch.search.interrupts import Interrupted, exit_code, sigterm_as_sigint

unix_only = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")


@unix_only
def test_sigterm_calls_the_sigint_handler_in_place_such_as_tunes():
    seen = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))  # stands in for Tune's
    try:
        with sigterm_as_sigint() as signals:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs in the main thread between bytecodes
        assert seen == [signal.SIGINT] and signals.name == "SIGTERM"
    finally:
        signal.signal(signal.SIGINT, previous)
    assert signal.getsignal(signal.SIGTERM) is not None  # restored, whatever it was


@unix_only
def test_sigterm_outside_tune_raises_interrupted_with_exit_143():
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(Interrupted) as caught, sigterm_as_sigint():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert caught.value.exit_code == 143 and exit_code(caught.value) == 143
        assert exit_code(KeyboardInterrupt()) == 130
    finally:
        signal.signal(signal.SIGINT, previous)


@unix_only
def test_sigterm_while_preparing_exits_143_and_creates_no_run(tmp_path):
    """`kill` during the teacher phase: exit 143, one line, no traceback, no MLflow store."""
    env = {**os.environ, "KDSEARCH_CACHE_DIR": str(tmp_path / "cache")}
    space = tmp_path / "space.yaml"
    space.write_text("teacher: {family: cnn, epochs: 50, config: {channels: 32}}\nstudents: {mlp: {width: 16}}\n")
    proc = subprocess.Popen([sys.executable, "-m", "kdsearch.search.cli", "run", str(space), "--tracking-uri",
                             f"sqlite:///{tmp_path}/mlflow.db"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:  # wait until the teacher trains (its 50 epochs take far longer than this test)
        lines.append(line)
        if "training the cnn teacher" in line:
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=60)[1]
    text = "".join(lines) + rest
    assert proc.returncode == 143, text
    assert "kdsearch: interrupted" in text and "Traceback" not in text
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
