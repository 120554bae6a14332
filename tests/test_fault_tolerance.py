"""Fault tolerance, for real: a worker node dies under a running search (cluster/local.sh), and a
driver is SIGKILLed and resumed (`kdsearch resume`). Both check, in the Tune experiment state
and the MLflow store, that no trial is lost, fails or gets a second MLflow run.

Both searches use the built-in digits space with a 1-epoch teacher and 1 fine-tune epoch after
pruning (the teacher's quality does not matter here; run alone, this file then trains a teacher
in seconds instead of over a minute). The file shares one space file, so the second test reuses the
teacher the first one cached in the session's KDSEARCH_CACHE_DIR.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Optional

import pytest
import yaml

from conftest import ROOT, cluster_env, dominates

LOCAL_SH = ROOT / "cluster" / "local.sh"
OBJECTIVES = {"val_acc": "max", "latency_ms": "min", "params": "min"}
EPOCHS = 4  # distillation epochs per trial of the resumed search; a pruned trial adds 1 fine-tune epoch

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not all(shutil.which(t) for t in ("bash", "setsid", "flock", "ps")),
    reason="needs Linux (/proc, loopback 127.0.0.x) with bash, setsid, flock, ps",
)


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def space_file(tmp_path_factory) -> Path:
    """The built-in digits space with a cheap teacher and short post-pruning fine-tuning."""
    from kdsearch.spaces import DEFAULT_SPACE

    raw = yaml.safe_load(Path(DEFAULT_SPACE).read_text())
    raw["name"] = "digits-ft"
    raw["teacher"]["epochs"] = 1
    raw["compress"]["finetune_epochs"] = 1
    path = tmp_path_factory.mktemp("space") / "digits-ft.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def note(msg: str) -> None:
    """A timestamped line on stdout: pytest shows them for a failing test (or with -s)."""
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)




def session_members(sid: int) -> dict[int, str]:
    """Live (non-zombie) processes of session ``sid``: pid -> command line (Ray's process titles)."""
    ps = ["ps", "-ww", "-e", "-o", "pid=,sid=,stat=,args="]
    out = subprocess.run(ps, capture_output=True, text=True, check=True).stdout
    members = {}
    for line in out.splitlines():
        pid, s, stat, *args = line.split(None, 3)
        if int(s) == sid and not stat.startswith("Z"):
            members[int(pid)] = args[0] if args else ""
    return members


def kill_session(sid: int) -> None:
    """SIGKILL what is left of a session this test started (by PID, one by one)."""
    for pid in session_members(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Stderr:
    """Collects a child's stderr lines in a thread, so the test can poll them without blocking."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc.stderr,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(f"{time.strftime('%H:%M:%S')} {line.rstrip()}")

    def text(self) -> str:
        return "\n".join(self.lines)

    def tune_folder(self) -> Optional[str]:
        for line in list(self.lines):
            m = re.search(r"(?:^|\s)tune folder (\S+) \(resume with", line)
            if m:
                return m.group(1)
        return None

    def done(self) -> int:
        """Trials finished so far, from the progress lines `[  2/6] running ...`."""
        counts = [int(n) for line in list(self.lines) for n in re.findall(r"\[\s*(\d+)/\d+\] running", line)]
        return max(counts, default=0)


def experiment_state(tune_folder: str) -> dict[str, dict]:
    """trial_id -> {status, num_failures, last_result} from the newest experiment_state-*.json Tune synced."""
    files = sorted(Path(tune_folder).glob("experiment_state-*.json"))
    if not files:
        return {}
    data = json.loads(files[-1].read_text())
    trials = {}
    for trial_json, meta_json in data["trial_data"]:
        trial, meta = json.loads(trial_json), json.loads(meta_json)
        trials[trial["trial_id"]] = {"status": trial["status"], "num_failures": meta["num_failures"],
                                     "last_result": meta.get("last_result") or {}}
    return trials


def read_state(tune_folder: str, timeout: float = 10) -> dict[str, dict]:
    """experiment_state() retried: Tune may be rewriting the file as we read it."""
    deadline = time.time() + timeout
    while True:
        try:
            return experiment_state(tune_folder)
        except (json.JSONDecodeError, KeyError, OSError):
            if time.time() > deadline:
                raise
            time.sleep(0.2)


def logged_search(tracking_uri: str, experiment: str):
    """The one parent run of ``experiment`` and its nested runs, with each run's val_acc steps."""
    from kdsearch.search.tracking import PARENT_TAG, ROLE_TAG, client, experiment_id

    c = client(tracking_uri)
    exp = experiment_id(c, experiment, create=False)
    parents = c.search_runs([exp], filter_string=f"tags.`{ROLE_TAG}` = 'search'")
    assert len(parents) == 1, [p.info.run_id for p in parents]
    parent = parents[0]
    runs = c.search_runs([exp], filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'", max_results=1000)
    steps = {r.info.run_id: [m.step for m in c.get_metric_history(r.info.run_id, "val_acc")] for r in runs}
    return c, parent, runs, steps


def check_front(c, parent, runs) -> None:
    """pareto_front.json is exactly the brute-force front of the complete trials."""
    from kdsearch.search.tracking import STATUS_TAG, read_artifact_json

    complete = [{"trial": r.info.run_name, **{m: r.data.metrics[m] for m in OBJECTIVES}}
                for r in runs if r.data.tags[STATUS_TAG] == "complete"]
    expected = {a["trial"] for a in complete if not any(dominates(b, a, OBJECTIVES) for b in complete)}
    payload = read_artifact_json(c, parent.info.run_id, "pareto_front.json")
    assert {row["trial"] for row in payload["front"]} == expected
    assert expected


def check_one_run_per_trial(runs, trial_ids) -> None:
    from kdsearch.search.tracking import STATUS_TAG, TRIAL_TAG

    # a trial that started after Tune last saved its state, then the driver died, is one Tune never
    # resumes: its run is closed as lost, apart from the search's trials
    lost = [r for r in runs if r.data.tags.get(STATUS_TAG) == "lost"]
    assert all(r.info.status == "KILLED" and r.data.tags[TRIAL_TAG] not in trial_ids for r in lost), lost
    runs = [r for r in runs if r not in lost]
    logged = [r.data.tags.get(TRIAL_TAG) for r in runs]
    assert sorted(logged) == sorted(trial_ids), "each trial must have exactly one nested run"
    assert len(set(logged)) == len(logged)
    statuses = {r.data.tags[TRIAL_TAG]: r.data.tags[STATUS_TAG] for r in runs}
    assert set(statuses.values()) == {"complete"}, statuses  # scheduler none: nothing may end pruned or failed
    assert {r.info.status for r in runs} == {"FINISHED"}


# --------------------------------------------------------------------------- 1: a worker node dies




def _sh(env: dict, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(LOCAL_SH), *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"local.sh {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def cluster(tmp_path, space_file, teacher_cache):
    """A head (1 CPU) + one worker (1 CPU) from cluster/local.sh; the teacher trains while they start."""
    state = tmp_path / "cluster"
    env = cluster_env(state)
    up = subprocess.Popen(["bash", str(LOCAL_SH), "up", "--workers", "1"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        from kdsearch.spaces import load_space
        from kdsearch.trainers.trial import prepare

        note("local.sh up started; preparing the teacher")
        prepare(load_space(str(space_file)))  # trains and caches the teacher the driver will load
        note("teacher ready")
        out, err = up.communicate(timeout=180)
        note("cluster up")
        assert up.returncode == 0, f"local.sh up -> {up.returncode}\n{out}\n{err}"
        yield {"state": state, "env": env, "address": (state / "address").read_text().strip()}
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        _sh(env, "down", "--grace", "5", check=False)
        note("cluster down")


NODE_EPOCHS = 6  # long enough that a trial on the worker is caught mid-distillation

NODE_LOSS_DRIVER = textwrap.dedent(
    """
    import json, logging, sys
    from kdsearch import run_search

    logging.basicConfig(level=logging.WARNING, format="%%(message)s")
    logging.getLogger("kdsearch").setLevel(logging.INFO)  # the library prints nothing; the test reads its log

    address, folder, space = sys.argv[1:4]
    result = run_search(space, address=address, num_samples=4, max_concurrent=2, epochs=%d, max_failures=3,
                        scheduler="none", tracking_uri=f"sqlite:///{folder}/mlflow.db", experiment="nodeloss",
                        storage=f"{folder}/ray", seed=0, log_models=False)
    print("RESULT " + json.dumps({"tune_path": result.tune_path, "counts": result.counts}), flush=True)
    """ % NODE_EPOCHS
)

TRIAL_DIR = re.compile(r"^\w+?_([0-9a-f]{8})_\d+_")  # {trainable}_{trial_id}_{index}_{config}_{date}


def worker_trial(state: Path) -> Optional[tuple[int, str]]:
    """(pid, trial_id) of a trial actor running on worker 0, found among the worker node's processes:
    Tune's function trainables run as `ray::ImplicitFunc` with their cwd in the trial's folder."""
    sid = int((state / "nodes" / "worker-0.pid").read_text())
    for pid, title in session_members(sid).items():
        if title.startswith("ray::ImplicitFunc"):
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                continue
            m = TRIAL_DIR.match(Path(cwd).name)
            if m:
                return pid, m.group(1)
    return None


def steps_in_logging_order(c, run_id: str) -> list[int]:
    history = c.get_metric_history(run_id, "val_acc")
    return [m.step for m in sorted(history, key=lambda m: (m.timestamp, m.step))]


@linux_only
@pytest.mark.timeout(420)
def test_search_survives_losing_a_worker_node(cluster, tmp_path, space_file):
    """SIGKILL the worker node while a trial trains there: Tune retries that trial from its last
    epoch checkpoint (on the head, or on the worker once it is back), and the search ends with
    every trial complete, each in exactly one MLflow run."""
    from kdsearch.search.tracking import LATENCY_TAG, TRIAL_TAG, client

    state, env = cluster["state"], cluster["env"]
    folder = tmp_path / "search"
    folder.mkdir()
    uri = f"sqlite:///{folder}/mlflow.db"
    driver_env = {k: v for k, v in env.items() if not k.startswith("RAY_health_check")}
    driver_env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(state / "auth_token"))
    stdout = folder / "stdout.txt"
    with stdout.open("w") as out:
        driver = subprocess.Popen(
            [sys.executable, "-c", NODE_LOSS_DRIVER, cluster["address"], str(folder), str(space_file)],
            cwd=ROOT, env=driver_env, stdout=out, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
    stderr = Stderr(driver)
    revived: dict[str, object] = {}

    def revive() -> None:
        """Once the GCS has declared worker 0 dead, start it again, as a replacement spot VM would
        join; meanwhile the search goes on with the head's CPU."""
        try:
            deadline = time.time() + 60
            while True:
                st = _sh(env, "status", check=False, timeout=60)
                if st.returncode == 1 and "DEAD" in st.stdout:
                    break
                assert time.time() < deadline, st.stdout
                time.sleep(0.5)
            note("worker 0 is DEAD in the GCS; starting it again")
            _sh(env, "start-worker", "0")
            note("worker 0 is back")
            revived["ok"] = True
        except BaseException as exc:  # reported by the test below
            revived["error"] = exc

    try:
        # Wait until a trial on the worker has had two epochs logged to MLflow by the driver (so
        # Tune holds a checkpoint of it: a save lags its result by at most one epoch) and is
        # still distilling.
        deadline = time.time() + 240
        c, run_ids = None, {}
        while True:
            assert driver.poll() is None, f"the search ended before a trial was caught on the worker\n{stderr.text()}"
            assert time.time() < deadline, f"no trial caught on the worker\n{stderr.text()}"
            found = worker_trial(state)
            if found and stderr.tune_folder():  # the driver has set up the MLflow store by now
                pid, trial_id = found
                try:
                    c = c or client(uri)
                    if trial_id not in run_ids:
                        runs = c.search_runs([c.get_experiment_by_name("nodeloss").experiment_id],
                                             filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}'")
                        if runs:
                            run_ids[trial_id] = runs[0].info.run_id
                    steps_before = steps_in_logging_order(c, run_ids[trial_id]) if trial_id in run_ids else []
                except Exception:  # the driver is writing to the store: try again
                    steps_before = []
                if 2 <= len(steps_before) and max(steps_before) < NODE_EPOCHS - 1 and worker_trial(state) == found:
                    break
            time.sleep(0.1)

        note(f"killing worker 0: trial {trial_id} (pid {pid}) has logged epochs {steps_before}")
        killed = _sh(env, "kill-worker", "0")
        assert str(pid) in killed.stdout.split()  # the trial's process went down with its node
        reviver = threading.Thread(target=revive, daemon=True)
        reviver.start()
        driver.wait(timeout=300)
        note(f"search ended: {driver.returncode}")
        reviver.join(timeout=120)
    finally:
        if driver.poll() is None:
            kill_session(driver.pid)
            driver.wait()
    assert driver.returncode == 0, f"the search failed\n{stderr.text()[-6000:]}"
    assert revived.get("ok"), revived.get("error")
    result = json.loads(stdout.read_text().split("RESULT ", 1)[1])
    assert result["counts"]["complete"] == 4 and result["counts"]["failed"] == 0, result

    # Tune: every trial ended, and the killed one was retried
    trials = read_state(result["tune_path"])
    assert len(trials) == 4
    assert {t["status"] for t in trials.values()} == {"TERMINATED"}, trials
    assert trials[trial_id]["num_failures"] >= 1, {k: t["num_failures"] for k, t in trials.items()}

    # MLflow: one parent, one nested run per trial, all complete, the front right
    c, parent, runs, _ = logged_search(uri, "nodeloss")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[LATENCY_TAG] == "measurer"  # two trials, 1-CPU nodes: they may share a core
    check_one_run_per_trial(runs, list(trials))
    check_front(c, parent, runs)

    # The retried trial went on from a checkpoint, not from scratch: in logging order its epochs
    # never go back, and at most the one whose save was in flight at the kill is logged twice.
    history = steps_in_logging_order(c, run_ids[trial_id])
    assert history[: len(steps_before)] == steps_before
    assert history == sorted(history), history
    assert sorted(set(history)) == list(range(1, max(history) + 1)) and max(history) >= NODE_EPOCHS, history
    assert len(history) - len(set(history)) <= 1, history


# --------------------------------------------------------------------------- 2: the driver dies


#: what holds a Ray node's resources: the raylet, the GCS and the worker processes, which must die
#: with the driver that started them. (Its dashboard and runtime-env agents, and a worker process
#: still importing when the raylet died, exit by themselves later, within about a minute.)
RAY_CORE_EXECUTABLES = ("raylet", "gcs_server")
RAY_CORE_TITLES = ("ray::ImplicitFunc", "ray::LatencyMeasurer", "ray::IDLE")


def ray_core_left(sid: int) -> dict[int, str]:
    return {pid: cmd for pid, cmd in session_members(sid).items()
            if cmd.startswith(RAY_CORE_TITLES) or Path(cmd.split(" ", 1)[0]).name in RAY_CORE_EXECUTABLES}


def start_search(tmp_path: Path, space_file: Path, teacher_cache: Path, experiment: str, num_samples: int,
                 stdout: int) -> tuple[str, dict[str, str], subprocess.Popen]:
    """`kdsearch run` in its own session (so a test can signal or kill it and all it started):
    its tracking URI, its environment and the process."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    env["KDSEARCH_CACHE_DIR"] = str(teacher_cache)
    # Tune saves its experiment state every 10 s or more by default; every second here, so the
    # state on disk soon shows the first trials as ended
    env["TUNE_GLOBAL_CHECKPOINT_S"] = "1"
    run = subprocess.Popen(
        [sys.executable, "-m", "kdsearch.search.cli", "run", str(space_file), "--num-samples", str(num_samples),
         "--max-concurrent", "2", "--epochs", str(EPOCHS), "--scheduler", "none", "--tracking-uri", uri,
         "--experiment", experiment, "--storage", str(tmp_path / "ray")],
        cwd=ROOT, env=env, stdout=stdout, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    return uri, env, run


@linux_only  # Ray's raylet and GCS fate-share with their driver through prctl(PR_SET_PDEATHSIG)
@pytest.mark.timeout(420)
def test_killed_driver_resumes_into_the_same_mlflow_search(tmp_path, space_file, teacher_cache):
    """SIGKILL `kdsearch run` after some trials completed, then `kdsearch resume`: one parent run,
    one nested run per trial, trials finished before the kill kept (not run again) and in the front."""
    uri, env, run = start_search(tmp_path, space_file, teacher_cache, "resume", 6, subprocess.DEVNULL)
    stderr = Stderr(run)
    note("kdsearch run started")
    try:
        # Kill once two trials completed and Tune's experiment state records them as ended, so the
        # resume must carry them over rather than run them again.
        deadline = time.time() + 240
        while True:
            assert run.poll() is None, f"the search ended before the kill\n{stderr.text()}"
            assert time.time() < deadline, f"no two trials recorded as ended\n{stderr.text()}"
            folder = stderr.tune_folder()
            if folder and stderr.done() >= 2:
                try:
                    ended = [t for t, s in experiment_state(folder).items() if s["status"] == "TERMINATED"]
                except (json.JSONDecodeError, KeyError, OSError):
                    ended = []
                if len(ended) >= 2:
                    break
            time.sleep(0.2)
        note(f"SIGKILL the driver: trials {ended} ended in Tune's state")
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        killed_at = time.time()
        assert len(ended) < 6, "the search finished before the kill"

        # Ray's processes die with their driver (raylet, GCS and workers fate-share with it)
        while ray_core_left(run.pid):
            assert time.time() < killed_at + 30, f"Ray outlived its driver: {ray_core_left(run.pid)}"
            time.sleep(0.2)

        at_kill = read_state(folder)
        ended = {t for t, s in at_kill.items() if s["status"] == "TERMINATED"}
        assert len(ended) >= 2

        note("Ray's processes are gone; resuming")
        resume = subprocess.run([sys.executable, "-m", "kdsearch.search.cli", "resume", folder], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=360)
        note(f"resume ended: {resume.returncode}")
        assert resume.returncode == 0, resume.stderr[-6000:]
        assert "resuming search" in resume.stderr
    finally:
        left = session_members(run.pid)
        note(f"left of the killed driver's session: {left}")
        kill_session(run.pid)  # agents that have not exited yet, or everything after a failure

    trials = read_state(folder)
    assert len(trials) == 6 and {t["status"] for t in trials.values()} == {"TERMINATED"}, trials

    from kdsearch.search.tracking import TRIAL_TAG

    c, parent, runs, steps = logged_search(uri, "resume")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["kdsearch.tune_path"] == folder
    check_one_run_per_trial(runs, list(trials))
    by_trial = {r.data.tags[TRIAL_TAG]: r for r in runs}
    for trial_id in ended:  # ended before the kill: adopted from Tune's state, not trained again
        history = steps[by_trial[trial_id].info.run_id]
        assert sorted(history) == list(range(1, max(history) + 1)), (trial_id, history)
    check_front(c, parent, runs)


# --------------------------------------------------------------------------- 3: Ctrl-C, then resume


def optuna_states(tune_folder: str) -> list[str]:
    """The states of the Optuna trials in the newest searcher state Tune saved."""
    import pickle

    newest = sorted(Path(tune_folder).glob("searcher-state-*.pkl"))[-1]
    with open(newest, "rb") as f:
        state = pickle.load(f)  # written by this test's own search
    return [t.state.name for t in state["_ot_study"].trials]


@linux_only
@pytest.mark.timeout(420)
@pytest.mark.parametrize("signum", [signal.SIGINT], ids=["ctrl-c"])
def test_interrupted_search_says_so_and_resumes_into_the_same_parent_run(tmp_path, space_file, teacher_cache, signum):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) on a 4-trial search once a
    trial completed: exit 130, the parent run KILLED with its front so far marked partial, the
    trials in flight KILLED and interrupted (not on the front, not PRUNED in Optuna); `kdsearch
    resume` then finishes every trial in the same parent run, numbering on from trial-004."""
    from kdsearch.search.tracking import NAME_TAG, PARTIAL_TAG, STATUS_TAG, TRIAL_TAG, read_artifact_json

    uri, env, run = start_search(tmp_path, space_file, teacher_cache, "interrupt", 4, subprocess.PIPE)
    stderr = Stderr(run)
    try:
        deadline = time.time() + 240
        while stderr.done() < 1:
            assert run.poll() is None, f"the search ended before the interrupt\n{stderr.text()}"
            assert time.time() < deadline, f"no trial completed\n{stderr.text()}"
            time.sleep(0.2)
        note(f"sending {signal.Signals(signum).name} to the search's process group")
        os.killpg(run.pid, signum)
        out, _ = run.communicate(timeout=120)
        assert run.returncode == 128 + signum, stderr.text()
        folder = stderr.tune_folder()
        assert f"kdsearch resume {folder}" in stderr.text()
        assert "students on the front so far (interrupted" in out
        assert "Traceback" not in stderr.text()
        c, parent, runs, _ = logged_search(uri, "interrupt")
        assert parent.info.status == "KILLED" and parent.data.tags[PARTIAL_TAG] == "true"
        statuses = {r.data.tags[NAME_TAG]: (r.info.status, r.data.tags[STATUS_TAG]) for r in runs}
        interrupted = {name for name, (status, tag) in statuses.items() if tag == "interrupted"}
        assert interrupted and all(statuses[n][0] == "KILLED" for n in interrupted), statuses
        payload = read_artifact_json(c, parent.info.run_id, "pareto_front.json")
        assert payload["partial"] is True and not {r["trial"] for r in payload["front"]} & interrupted
        # the driver's batched writes were flushed at the interrupt: every report Tune saw is in MLflow
        at_interrupt = read_state(folder)
        for r in runs:
            last = at_interrupt[r.data.tags[TRIAL_TAG]]["last_result"].get("training_iteration", 0)
            assert sorted(m.step for m in c.get_metric_history(r.info.run_id, "epoch")) == list(range(1, last + 1)), statuses
        assert "PRUNED" not in optuna_states(folder) and "RUNNING" in optuna_states(folder)
        export = subprocess.run([sys.executable, "-m", "kdsearch.search.cli", "export", "--tracking-uri", uri,
                                 "--experiment", "interrupt", "--out", str(tmp_path / "exports")], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=120)
        assert export.returncode == 2 and f"kdsearch resume {folder}" in export.stderr, export.stderr
        assert not (tmp_path / "exports").exists()  # the latest search is skipped: it did not finish
        ended = time.time()
        while ray_core_left(run.pid):  # ray.shutdown() stops them; give them a moment to exit
            assert time.time() < ended + 30, f"Ray outlived the interrupted driver: {ray_core_left(run.pid)}"
            time.sleep(0.2)

        resume = subprocess.run([sys.executable, "-m", "kdsearch.search.cli", "resume", folder], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=360)
        assert resume.returncode == 0, resume.stderr[-6000:]
    finally:
        kill_session(run.pid)

    c, parent, runs, steps = logged_search(uri, "interrupt")
    assert parent.info.status == "FINISHED" and parent.data.tags[PARTIAL_TAG] == "false"
    trials = read_state(folder)
    assert len(trials) == 4 and {t["status"] for t in trials.values()} == {"TERMINATED"}, trials
    check_one_run_per_trial(runs, list(trials))
    assert sorted(r.data.tags[NAME_TAG] for r in runs) == [f"trial-{i:03d}" for i in range(1, 5)]
    assert read_artifact_json(c, parent.info.run_id, "pareto_front.json")["partial"] is False
    check_front(c, parent, runs)
