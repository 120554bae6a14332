"""What a search costs beyond its trials: MLflow writes off Tune's loop, latency timed in the trial
where no core is shared, Ray started while the teacher phase runs."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from kdsearch.search.latency import local_latency_fn, trial_latency_fn, trials_share_cores
from kdsearch.search.tracking import NAME_TAG, STATUS_TAG, MlflowWriter, client, experiment_id, run_id_of
from kdsearch.spaces.errors import TrackingError

OBJECTIVES = {"val_acc": "max", "latency_ms": "min", "params": "min"}


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """A real sqlite MLflow store (made once: its migrations take seconds)."""
    return client(f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db")


@pytest.fixture
def store(tracking, request):
    """The store and an experiment of this test's own."""
    return tracking, experiment_id(tracking, request.node.name, create=True)


class BlockedStore:
    """Holds every ``log_batch`` of ``c`` until :meth:`release`: a store that stalls (a slow server, a busy disk)."""

    def __init__(self, c) -> None:
        self.open, self.client = threading.Event(), c
        self._log_batch = c.log_batch
        c.log_batch = self._blocked

    def _blocked(self, *args, **kwargs):
        self.open.wait(timeout=60)
        return self._log_batch(*args, **kwargs)

    def release(self) -> None:
        del self.client.log_batch  # the client's own again
        self.open.set()


# --------------------------------------------------------------------------- the writer


def test_writer_merges_each_runs_writes_in_order_and_loses_none(store):
    c, exp = store
    writer = MlflowWriter(c)
    runs = [writer.create_run(exp, f"r{i}", {"kind": "test"}) for i in range(3)]
    for step in range(1, 41):
        for i, run in enumerate(runs):
            writer.log(run, {"val_acc": step / 100 + i, "flag": True, "bad": float("nan")}, step,
                       params={"lr": 0.01} if step == 1 else None, tags={STATUS_TAG: f"step {step}"})
    writer.log(runs[0], tags={STATUS_TAG: "complete", "mlflow.runName": "r0 (renamed)"})
    writer.terminate(runs[0], "FINISHED")
    writer.log(runs[0], tags={"after_end": "yes"})  # after the end, still in order
    writer.close()
    for i, future in enumerate(runs):
        run = c.get_run(future.result())
        history = c.get_metric_history(run.info.run_id, "val_acc")
        assert sorted(m.step for m in history) == list(range(1, 41))
        assert {m.step: m.value for m in history}[40] == pytest.approx(0.4 + i)
        assert "flag" not in run.data.metrics and "bad" not in run.data.metrics  # numeric and finite only
        assert run.data.params == {"lr": "0.01"} and run.data.tags["kind"] == "test"
    first = c.get_run(runs[0].result())
    assert first.data.tags[STATUS_TAG] == "complete" and first.info.run_name == "r0 (renamed)"
    assert first.info.status == "FINISHED" and first.data.tags["after_end"] == "yes"
    assert c.get_run(runs[1].result()).data.tags[STATUS_TAG] == "step 40"  # the last of 40 values


def test_writer_raises_a_failed_write_at_flush_and_writes_the_rest(store):
    c, exp = store
    writer = MlflowWriter(c)
    good = writer.create_run(exp, "good", {})
    writer.log("no-such-run", {"x": 1.0})
    writer.log(good, {"x": 2.0}, 1)
    with pytest.raises(TrackingError, match="1 MLflow writes failed"):
        writer.flush()
    writer.flush()  # reported once
    writer.close()
    assert c.get_run(good.result()).data.metrics == {"x": 2.0}


# --------------------------------------------------------------------------- the recorder on a stalled store


def trial(trial_id: str, last_result=None):
    return SimpleNamespace(trial_id=trial_id, config={"student.family": "cnn", "train.lr": 0.01},
                           last_result=last_result, checkpoint=None, error_file=None)


def test_recorder_never_waits_on_the_store_and_every_result_lands_even_when_interrupted(store):
    """Tune's loop (these callbacks) goes on while the store is stalled; an interrupt then marks the
    trials in flight, and once the store answers every trial has every metric it reported."""
    from kdsearch.search.recorder import SearchRecorder

    c, exp = store
    parent = c.create_run(exp, run_name="search").info.run_id
    recorder = SearchRecorder(c, exp, parent, OBJECTIVES, {"val_acc": 0, "latency_ms": 10, "params": 1e5}, total=3)
    stalled = BlockedStore(c)
    trials = [trial(f"t{i}") for i in range(3)]
    started = time.perf_counter()
    for t in trials:
        recorder.on_trial_start(0, [], t)
    for step in range(1, 21):
        for t in trials:
            recorder.on_trial_result(0, [], t, {"val_acc": step / 20, "epoch": step / 2, "training_iteration": step,
                                                "latency_ms": 1.0, "params": 1000, "runtime": "onnxruntime",
                                                "time_this_iter_s": 0.1})
    final = {"val_acc": 0.9, "latency_ms": 1.0, "params": 1000, "size_bytes": 4000, "training_iteration": 21}
    trials[0].last_result = final
    recorder.on_trial_result(0, [], trials[0], final)
    recorder.on_trial_complete(0, [], trials[0])
    interrupted = recorder.interrupt()  # Ctrl-C: the other two were in flight
    loop_seconds = time.perf_counter() - started
    writer = recorder.writer
    assert writer is not None and not stalled.open.is_set()
    stalled.release()
    recorder.close()
    assert writer.calls <= 20, f"{writer.calls} store calls for 61 results of 3 trials: not batched"
    assert loop_seconds < 5, "the callbacks waited on the store"
    assert interrupted == ["trial-002", "trial-003"]
    for t in trials:
        run = c.get_run(run_id_of(recorder.run_ids[t.trial_id]))
        steps = sorted(m.step for m in c.get_metric_history(run.info.run_id, "val_acc"))
        assert steps == list(range(1, 22 if t is trials[0] else 21)), (t.trial_id, steps)
        assert "time_this_iter_s" not in run.data.metrics and run.data.tags["kdsearch.runtime"] == "onnxruntime"
        assert run.data.params["train.lr"] == "0.01"
    done = c.get_run(recorder.rows["t0"]["run_id"])
    assert (done.info.status, done.data.tags[STATUS_TAG]) == ("FINISHED", "complete") and done.data.metrics["size_bytes"] == 4000
    for t in trials[1:]:
        run = c.get_run(run_id_of(recorder.run_ids[t.trial_id]))
        assert (run.info.status, run.data.tags[STATUS_TAG]) == ("KILLED", "interrupted")
        assert run.info.run_name == f"{run.data.tags[NAME_TAG]} (interrupted)"
    assert [m.step for m in c.get_metric_history(parent, "hypervolume_search")] == [1]
    assert isinstance(recorder.rows["t0"]["run_id"], str)  # resolved by the flush, for the front and the result


def test_recorder_pickles_without_its_writer(store):
    """Tune pickles its callbacks into the experiment folder; the writer thread and runs still being created stay out."""
    import cloudpickle

    from kdsearch.search.recorder import SearchRecorder

    c, exp = store
    parent = c.create_run(exp, run_name="search").info.run_id
    recorder = SearchRecorder(c, exp, parent, OBJECTIVES, {"val_acc": 0, "latency_ms": 10, "params": 1e5}, total=1)
    recorder.on_trial_start(0, [], trial("t0"))
    copy = cloudpickle.loads(cloudpickle.dumps(recorder))
    assert copy.writer is None and recorder.writer is not None
    recorder.close()


# --------------------------------------------------------------------------- where latency is timed


@pytest.mark.parametrize("max_concurrent, cpus_per_trial, node_cpus, shared", [
    (2, 1, [2], False),        # the demo on 2 cores: each trial has its core
    (1, 4, [2], False),        # one trial at a time shares with nothing
    (8, 1, [2], False),        # Ray runs only 2 at once on 2 CPUs
    (2, 0.5, [2], False),      # two half-CPU trials, one thread each, on 2 cores
    (4, 0.5, [2], True),       # four threads on 2 cores
    (2, 1, [1, 1], True),      # a 1-CPU head and a 1-CPU worker: the smallest node holds one
    (4, 2, [0, 8, 8], False),  # a 0-CPU head (no trials) and two 8-CPU workers
    (8, 2, [0, 8, 8], True),
    (2, 1, [], True),          # no CPU node yet (autoscaling): assume they share
    (1, 1, [], False),
])
def test_trials_share_cores_rule(max_concurrent, cpus_per_trial, node_cpus, shared):
    assert trials_share_cores(max_concurrent, cpus_per_trial, node_cpus) is shared


def test_in_trial_latency_is_timed_once_per_structure_in_the_trials_process(digits_space):
    calls = []
    runtime = SimpleNamespace(latency=lambda deployed, example, batch_size, device="cpu":
                              calls.append(batch_size) or f"figure {len(calls)}")
    deployed = SimpleNamespace(runtime=runtime)
    params = {"student.family": "cnn", "student.cnn.stages": 2, "compress.prune_ratio": 0.0, "train.lr": 0.01}
    other_lr = {**params, "train.lr": 0.02}  # same structure
    other_stages = {**params, "student.cnn.stages": 3}
    assert local_latency_fn(digits_space, params)(deployed, None, 1) == "figure 1"
    assert local_latency_fn(digits_space, other_lr)(deployed, None, 1) == "figure 1"
    assert local_latency_fn(digits_space, other_stages)(deployed, None, 1) == "figure 2"
    assert calls == [1, 1]
    assert trial_latency_fn(None, digits_space, params).__qualname__.startswith("local_latency_fn")
    assert trial_latency_fn(object(), digits_space, params).__qualname__.startswith("remote_latency_fn")


@pytest.fixture
def no_ray():
    import ray

    assert not ray.is_initialized()
    yield
    ray.shutdown()


def test_worker_preload_only_where_few_preloaded_workers_would_idle(monkeypatch):
    from kdsearch.search.driver import WORKER_PRELOAD, worker_preload
    from kdsearch.search.options import SearchOptions

    monkeypatch.setattr("kdsearch.search.driver.os.cpu_count", lambda: 2)
    assert worker_preload(SearchOptions()) == WORKER_PRELOAD  # the demo: 2 CPUs, 2 trials at a time
    assert worker_preload(SearchOptions(address="127.0.0.1:6379")) == ()  # a cluster's workers are its own
    monkeypatch.setattr("kdsearch.search.driver.os.cpu_count", lambda: 64)
    assert worker_preload(SearchOptions()) == ()  # 62 idle workers holding torch
    assert worker_preload(SearchOptions(max_concurrent=60, num_samples=100)) == WORKER_PRELOAD


def test_measurer_actor_only_where_trials_share_cores_and_ray_start_in_the_background(digits_space, no_ray, capfd):
    """The Ray session a background start made outlives the thread's start (Ray's GCS and raylet die
    with the thread that spawned them), its workers have the trial's modules imported, SIGTERM still
    reaches the Python handler (not Ray's C++ one); the measurer actor exists only where trials share
    cores; a start that no search took is shut down."""
    import os
    import signal

    import ray

    from kdsearch.search.driver import WORKER_PRELOAD, RayStart, ray_starting
    from kdsearch.search.latency import latency_measurer
    from kdsearch.search.options import SearchOptions

    with pytest.raises(RuntimeError, match="teacher phase failed"), ray_starting(SearchOptions()):
        raise RuntimeError("teacher phase failed")
    assert not ray.is_initialized()

    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))  # stands in for the CLI's
    start = RayStart(None, WORKER_PRELOAD)
    assert start.wait() is True
    try:
        time.sleep(1.5)  # long past start_ray's return
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        assert seen == [signal.SIGTERM] and "SIGTERM received" not in capfd.readouterr().err

        @ray.remote(num_cpus=1)
        def preloaded() -> bool:
            import sys

            return all(m in sys.modules for m in WORKER_PRELOAD)

        assert ray.get(preloaded.remote(), timeout=120)
        cpus = int(ray.cluster_resources()["CPU"])
        assert latency_measurer(digits_space, (1, 8, 8), 10, max_concurrent=cpus, cpus_per_trial=1) is None
        measurer = latency_measurer(digits_space, (1, 8, 8), 10, max_concurrent=2 * cpus, cpus_per_trial=0.5)
        assert isinstance(measurer, ray.actor.ActorHandle) and hasattr(measurer, "measure")
        ray.kill(measurer)
    finally:
        signal.signal(signal.SIGTERM, previous)
        ray.shutdown()
        start.release()
