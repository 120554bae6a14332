"""``kdsearch run``: a Ray Tune search over a space, tracked in MLflow.

Data and teacher outputs are prepared once in the driver and shared with every trial through
the Ray object store; trials report to Tune; the driver alone talks to MLflow.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Optional

from ray.tune.stopper import Stopper

from kdsearch.search.options import SCHEDULERS, SearchOptions, default_storage
from kdsearch.search.result import SearchResult, rows_frame
from kdsearch.spaces import Choice, Fixed, FloatRange, IntRange, Space, load_space
from kdsearch.spaces.errors import UserError

log = logging.getLogger("kdsearch")

def knob_max(knob: Any, default: int) -> int:
    if isinstance(knob, Fixed):
        return int(knob.value)
    if isinstance(knob, Choice):
        return int(max(knob.values))
    if isinstance(knob, (IntRange, FloatRange)):
        return int(knob.high)
    return default


def max_epochs(space: Space, override: Optional[int]) -> int:
    """The longest schedule a trial of this space can run: distillation plus post-pruning fine-tune."""
    train, compress = space.sections["train"], space.sections["compress"]
    distil = override or knob_max(train.get("epochs"), 10)
    prune = compress.get("prune_ratio")
    may_prune = prune is not None and not (isinstance(prune, Fixed) and prune.value == 0)
    return distil + (knob_max(compress.get("finetune_epochs"), 2) if may_prune else 0)


# --------------------------------------------------------------------------- the trial inside Tune

#: the final metrics, kept beside the student in a trial's last checkpoint
FINAL_METRICS = "final_metrics.json"


def distil_trainable(config: dict[str, Any], *, space: Space, context: Any, measurer: Any, seed: int,
                     epochs: Optional[int], report_at: tuple[float, ...] = ()) -> None:
    """One trial in a Tune worker: resume from its checkpoint if any, report every epoch.

    ``measurer``: the latency actor where trials share cores, else None (the trial times its own file).
    """
    import ray
    import torch
    from ray import tune

    from kdsearch.search.latency import trial_latency_fn
    from kdsearch.spaces.errors import TrialDiverged
    from kdsearch.trainers.trial import run_trial

    warnings.filterwarnings("ignore")
    resources = tune.get_context().get_trial_resources().required_resources
    torch.set_num_threads(max(1, int(resources.get("CPU", 1))))
    device = "cuda" if resources.get("GPU", 0) > 0 and torch.cuda.is_available() else "cpu"
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            final = Path(folder) / FINAL_METRICS
            if final.is_file():  # the trial had finished: report it again rather than retrain it
                tune.report(json.loads(final.read_text()), checkpoint=tune.Checkpoint.from_directory(folder))
                return
            state = Path(folder) / "state.pt"
            if state.is_file():
                resume = torch.load(state, weights_only=True, map_location=device)

    with tempfile.TemporaryDirectory() as artifact_dir:
        def report(metrics: dict[str, Any], state: Optional[dict[str, Any]] = None) -> None:
            if "size_bytes" in metrics:
                (Path(artifact_dir) / FINAL_METRICS).write_text(json.dumps(metrics, default=str))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(artifact_dir))
            elif state is not None:
                with tempfile.TemporaryDirectory() as folder:
                    torch.save(state, Path(folder) / "state.pt")
                    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
            else:
                tune.report(metrics)

        try:
            run_trial(space, dict(config), report, context=ray.get(context) if isinstance(context, ray.ObjectRef) else context,
                      seed=seed, epochs=epochs, device=device, artifact_dir=artifact_dir,
                      latency_fn=trial_latency_fn(measurer, space, config), checkpoint_state=True, resume=resume,
                      report_at=report_at)
        except TrialDiverged as exc:
            # deterministic: reported, not raised, so Tune does not retry it as if a node had died
            # NaN objectives: the scheduler drops the trial from every rung it reached
            tune.report({"diverged": 1, "error": str(exc), **{m: float("nan") for m in space.objectives}})


# --------------------------------------------------------------------------- wiring


class EpochBudget(Stopper):
    """A Tune stopper: end the search once the trials together have trained ``budget`` epochs.

    Searches compared at equal compute stop here. A trial counts the furthest progress it
    reported (fractions of an epoch included), once: Tune shows a stopper a finished
    trial's last result twice, and a retried trial reports its epochs again.
    """

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.progress: dict[str, float] = {}  # trial_id -> epochs trained

    @property
    def spent(self) -> float:
        return sum(self.progress.values())

    def __call__(self, trial_id: str, result: dict) -> bool:
        progress = float(result.get("epoch", result.get("training_iteration", 0)))
        self.progress[trial_id] = max(progress, self.progress.get(trial_id, 0.0))
        return False

    def stop_all(self) -> bool:
        return self.spent >= self.budget


def report_points(scheduler: str, max_t: float, grace_period: float, reduction_factor: float) -> list[float]:
    """The rungs (ASHA's and pareto-asha's alike) that fall inside an epoch: trials report there too."""
    from kdsearch.search.schedulers import rung_milestones

    if scheduler == "none":
        return []
    return [m for m in rung_milestones(grace_period, reduction_factor, max_t) if m != int(m)]


def make_scheduler(name: str, space: Space, max_t: int, grace_period: float, reduction_factor: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if name == "asha":
        # one metric: accuracy (size and latency are fixed by the architecture)
        return ASHAScheduler(time_attr="epoch", metric="val_acc", mode="max", max_t=max_t,
                             grace_period=min(grace_period, max_t), reduction_factor=reduction_factor)
    if name == "pareto-asha":
        from kdsearch.search.schedulers import ParetoASHA

        metrics, modes = scheduler_objectives(space)
        return ParetoASHA(metrics=metrics, modes=modes, time_attr="epoch", max_t=max_t,
                          grace_period=min(grace_period, max_t), reduction_factor=reduction_factor)
    if name == "none":
        return FIFOScheduler()
    raise ValueError(f"--scheduler {name}: unknown; fix: use one of {', '.join(SCHEDULERS)}")


#: objectives known only at the end of a trial, and the per-epoch figure that stands in for them
#: (latency is measured before training, so the scheduler ranks on the real figure)
EPOCH_PROXY = {"size_bytes": "params"}


def scheduler_objectives(space: Space) -> tuple[list[str], list[str]]:
    """The objectives a trial reports every epoch: bytes on disk are ranked by their params proxy."""
    chosen: dict[str, str] = {}
    for metric, mode in space.objectives.items():
        chosen.setdefault(EPOCH_PROXY.get(metric, metric), mode)
    return list(chosen), list(chosen.values())


class ConstraintCheck:
    """A check of a sampled configuration against the space's size constraints, before launch.

    Params and MACs after pruning are known from the architecture, so a student that breaks
    ``max_params`` or ``max_macs`` is rejected without training and never takes a worker.
    A class, not a closure: Tune pickles the searcher (and this) into its experiment state.
    """

    def __init__(self, space: Space, input_shape: tuple[int, ...], num_classes: int) -> None:
        from kdsearch.trainers.trial import size_bounds

        self.space, self.input_shape, self.num_classes = space, tuple(input_shape), num_classes
        self.limits = size_bounds(space)

    def __call__(self, params: dict[str, Any]) -> Optional[str]:
        from kdsearch.trainers.trial import bound_violation, expected_footprint

        if not self.limits:
            return None
        footprint = expected_footprint(self.space, self.space.resolve(params), self.input_shape, self.num_classes)
        return bound_violation(footprint, self.limits)


def ray_environment() -> None:
    """The environment and log levels a search's Ray session and Tune run with (before Ray starts)."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "0")
    # latency and size arrive only with a trial's last result; the searcher reads them then
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)  # failed trials show in our progress line


def start_ray(address: Optional[str], preload: tuple[str, ...] = ()) -> bool:
    """Connect to ``address``, use this process's Ray session, or start one; True when started here
    (only a session started here is shut down at the end). ``preload``: modules the workers of
    a session started here import as they start (:func:`worker_preload`). Call
    :func:`ray_environment` first (:class:`RayStart` does)."""
    import ray

    from kdsearch.search.latency import LATENCY_RESOURCE

    if ray.is_initialized() and not address:
        return False
    common = {"logging_level": logging.ERROR, "log_to_driver": False}
    if address:
        try:
            ray.init(address=address, **common)
        except Exception as exc:
            raise UserError(f"--address {address}: cannot connect to the Ray cluster ({str(exc).splitlines()[0][:160]}); "
                            "fix: start it with cluster/local.sh up or check the address") from None
    else:
        config = {"preload_python_modules": list(preload)} if preload else {}
        ray.init(num_cpus=os.cpu_count(), resources={LATENCY_RESOURCE: 1}, include_dashboard=False,
                 _system_config=config, **common)
    return True


#: the modules a trial's worker imports (torch, Tune, the trial): preloaded, a first trial starts in
#: a fraction of a second instead of seconds
WORKER_PRELOAD = ("kdsearch.search.driver", "kdsearch.search.latency", "kdsearch.trainers.trial")
#: idle preloaded workers allowed beyond those the trials use (each holds about 200 MB of its own)
SPARE_PRELOADED = 4


def worker_preload(options: SearchOptions) -> tuple[str, ...]:
    """What the workers of a Ray session started here preload while the driver prepares.

    Ray starts one worker per CPU ahead of any work, and the first trials take them. Preloaded,
    each holds torch (about 200 MB more), so preloading is for a machine where few of them
    would sit idle: at most :data:`SPARE_PRELOADED` more than the trials that run at once.
    """
    cpus = os.cpu_count() or 1
    trials = min(options.max_concurrent, options.num_samples, max(1, int(cpus // options.cpus_per_trial)))
    return WORKER_PRELOAD if options.address is None and cpus <= trials + SPARE_PRELOADED else ()


class RayStart:
    """:func:`start_ray` in a background thread, so Ray's start-up (seconds) overlaps the teacher
    phase and the MLflow store's creation instead of delaying the first trial.

    The thread lives until :meth:`release`: Ray starts its GCS and raylet with
    ``PR_SET_PDEATHSIG``, which Linux fires when the *thread* that started them ends, so it
    must outlast the session (it exits with the process otherwise, as the process's Ray does).
    """

    def __init__(self, address: Optional[str], preload: tuple[str, ...] = ()) -> None:
        self.address, self.preload = address, preload
        self.taken = False  # a search has waited for it and owns what it started
        self._started: "Future[bool]" = Future()
        self._done = threading.Event()
        self._begun = time.perf_counter()
        self._ready = self._begun
        ray_environment()  # in the calling thread: the environment is set before another thread reads it
        threading.Thread(target=self._run, name="kdsearch-ray-start", daemon=True).start()

    def _run(self) -> None:
        try:
            with kept_sigterm():
                started = start_ray(self.address, self.preload)
            self._started.set_result(started)
        except BaseException as exc:  # handed to wait()
            self._started.set_exception(exc)
            return
        finally:
            self._ready = time.perf_counter()
        self._done.wait()

    def wait(self) -> bool:
        """What :func:`start_ray` returned (True: Ray was started here); raises what it raised."""
        asked = time.perf_counter()
        started = self._started.result()
        self.taken = True
        log.debug(f"Ray: ready ({self._ready - self._begun:.1f} s to start, waited {time.perf_counter() - asked:.1f} s)")
        return started

    def release(self) -> None:
        """After ``ray.shutdown()`` (or when this process did not start Ray): the thread may end."""
        self._done.set()

    def abandon(self) -> None:
        """No search took this start (it failed before its trials): shut down what it started."""
        import ray

        try:
            if self._started.result():
                ray.shutdown()
        except Exception:  # the start failed: nothing to stop
            pass
        finally:
            self.release()


@contextlib.contextmanager
def kept_sigterm() -> Iterator[None]:
    """SIGTERM's handler, as it was before what runs inside (``ray.init``), is put back after it.

    Ray's core worker installs its C++ failure handler for SIGTERM, which prints a stack and can
    abort the process, over the Python handler that stops a search gracefully
    (:mod:`kdsearch.search.interrupts`). Outside the main thread ``signal.signal`` cannot put
    it back, so the process-wide action is saved and restored with ``sigaction(2)``; crash
    signals keep Ray's handler. Nothing is done where there is no ``sigaction``.
    """
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        saved = ctypes.create_string_buffer(1024)  # larger than any struct sigaction
        saved_ok = libc.sigaction(signal.SIGTERM, None, saved) == 0
    except (OSError, AttributeError):  # no C library to ask (Windows)
        saved_ok = False
    try:
        yield
    finally:
        if saved_ok:
            libc.sigaction(signal.SIGTERM, saved, None)


#: the Ray start :func:`ray_starting` began, for :func:`take_ray_start`
_ray_start: Optional[RayStart] = None


@contextlib.contextmanager
def ray_starting(options: SearchOptions) -> Iterator[None]:
    """Start Ray in the background for what runs inside (the teacher phase, the store); the
    search's :func:`take_ray_start` takes it over. Not taken (a failure before): shut down."""
    global _ray_start
    _ray_start = start = RayStart(options.address, worker_preload(options))
    try:
        yield
    finally:
        _ray_start = None
        if not start.taken:
            start.abandon()


def take_ray_start(options: SearchOptions) -> RayStart:
    """The Ray start :func:`ray_starting` began for this search, or one begun now."""
    global _ray_start
    start, _ray_start = _ray_start, None
    return start if start is not None and start.address == options.address else RayStart(options.address,
                                                                                         worker_preload(options))


#: written into the Tune experiment folder so ``kdsearch resume`` finds the MLflow parent run again
RESUME_FILE = "kdsearch.json"


def check_resources(options: SearchOptions) -> None:
    """A search on this machine (no ``--address``) must fit it: Ray would wait forever for a GPU it lacks.
    A cluster's address must answer: ``ray.init`` would wait minutes for one that does not."""
    if options.address:
        check_address(options.address)
        return
    cpus = os.cpu_count() or 1
    if options.cpus_per_trial > cpus:
        raise UserError(f"cpus_per_trial (--cpus-per-trial): {options.cpus_per_trial:g} but this machine has {cpus} CPUs; "
                        f"fix: pass at most {cpus}, or --address of a cluster with larger nodes")
    if options.gpus_per_trial > 0:
        import torch

        gpus = torch.cuda.device_count()
        if options.gpus_per_trial > gpus:
            raise UserError(f"gpus_per_trial (--gpus-per-trial): {options.gpus_per_trial:g} but this machine has {gpus} GPUs; "
                            "fix: pass --gpus-per-trial 0, or --address of a cluster with GPUs")


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """``host:port`` (or ``ray://host:port``) accepts a TCP connection within ``timeout_s``; ``auto`` is Ray's to find."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise UserError(f"address (--address): {address} does not answer ({exc.strerror or exc}); fix: start the cluster "
                        "(cluster/local.sh up) or pass the head's address") from None


def check_objectives(space: Space) -> None:
    """A Pareto search needs two objectives or more: one is a single-objective search."""
    if len(space.objectives) < 2:
        raise UserError(f"objectives: only {', '.join(space.objectives)}; fix: add a second one (latency_ms: min or "
                        "params: min), or search one objective with Ray Tune's ASHA directly")


def as_space(space: "Space | str | Path | Mapping[str, Any] | None") -> Space:
    """A :class:`Space` from a Space, a file path, a dict, or None (the built-in digits space)."""
    return space if isinstance(space, Space) else load_space(space)


def run_search(space: "Space | str | Path | Mapping[str, Any] | None" = None, *,
               options: Optional[SearchOptions] = None, **values: Any) -> SearchResult:
    """Search ``space`` with Ray Tune and log it to MLflow; return its front and trials.

    Keyword values are :class:`~kdsearch.search.options.SearchOptions` fields (``num_samples``,
    ``tracking_uri``, ``experiment``, ``searcher``, ``scheduler``, ``seed``, ...), over ``options``
    when both are given. The search prints nothing: progress goes to the ``kdsearch`` logger.
    Ray is started for the search and stopped after it, unless this process had a Ray session
    already, which is used and left running.
    """
    space = as_space(space)
    options = SearchOptions.parse({**(options.model_dump(exclude_unset=True) if options else {}), **values})
    check_objectives(space)
    check_resources(options)
    check_space(space)  # all before any store, run or Ray session exists
    with ray_starting(options):  # Ray starts while the teacher phase runs and the store is made
        return _new_search(space, options)


def _new_search(space: Space, options: SearchOptions) -> SearchResult:
    """:func:`run_search` once its options are checked: the teacher phase, the parent run, the trials."""
    from mlflow.entities import Param

    from kdsearch.search.tracking import ROLE_TAG, SPACE_TAG, client, experiment_id

    context = prepare_context(space)
    mlflow_client = client(options.tracking_uri)
    exp_id = experiment_id(mlflow_client, options.experiment, create=True)
    name = options.name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = options.storage or default_storage(options.tracking_uri)
    storage = storage if "://" in storage else str(Path(storage).resolve())
    path = f"{storage}/{name}"
    space_sha = hashlib.sha256(space.text.encode()).hexdigest()
    warn_repeated_seed(mlflow_client, exp_id, space_sha, options.seed, options.searcher)
    parent = mlflow_client.create_run(exp_id, run_name=name, tags={ROLE_TAG: "search", "kdsearch.tune_path": path,
                                                                   SPACE_TAG: space_sha})
    parent_id = parent.info.run_id
    params = {k: v for k, v in options.model_dump().items() if v is not None}
    mlflow_client.log_batch(parent_id, params=[Param(k, str(v)) for k, v in params.items()])
    mlflow_client.log_text(parent_id, space.text, "space.yaml")
    if "://" not in path:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / RESUME_FILE).write_text(json.dumps(
            {"options": {**options.model_dump(), "name": name, "storage": storage}, "parent_run_id": parent_id,
             "experiment_id": exp_id, "space_text": space.text, "space_source": str(space.source)}, indent=2))
    log.info(f"search {name}: {options.num_samples} trials, searcher {options.searcher}, scheduler {options.scheduler}, "
             f"{options.max_concurrent} at a time")
    log.info(f"tune folder {path} (resume with: kdsearch resume {path})")
    return _drive(space, options, mlflow_client, exp_id, parent_id, path, restore=False, context=context)


def warn_repeated_seed(mlflow_client, exp_id: str, space_sha: str, seed: int, searcher: str) -> None:
    """Say so when an earlier search of this experiment ran the same space with the same seed and
    searcher: it draws the same configurations in the same order."""
    from kdsearch.search.tracking import ROLE_TAG, SPACE_TAG

    earlier = mlflow_client.search_runs([exp_id], filter_string=f"tags.`{ROLE_TAG}` = 'search' and "
                                        f"tags.`{SPACE_TAG}` = '{space_sha}' and params.seed = '{seed}' and "
                                        f"params.searcher = '{searcher}'", max_results=1)
    if earlier:
        log.warning(f"search {earlier[0].info.run_name} ran this space with seed {seed} and searcher {searcher} already: the same "
                    "configurations come again; pass --seed N for new ones")


def resume_search(path: str | Path) -> SearchResult:
    """Finish a search whose driver died: same Tune experiment, same MLflow parent run."""
    from kdsearch.spaces import parse_space
    from kdsearch.spaces.schema import read_yaml

    path = str(path) if "://" in str(path) else str(Path(path).resolve())
    meta_file = Path(path) / RESUME_FILE
    if not meta_file.is_file():
        raise UserError(f"{path}: no {RESUME_FILE} there; fix: pass the tune folder `kdsearch run` printed")
    try:
        meta = json.loads(meta_file.read_text())
        options = SearchOptions.parse({k: v for k, v in meta["options"].items() if k in SearchOptions.model_fields})
        source = Path(meta["space_source"]) if meta.get("space_source") not in (None, "None") else None
        text, parent_id, exp_id = meta["space_text"], meta["parent_run_id"], meta["experiment_id"]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{meta_file}: not a kdsearch resume file ({type(exc).__name__}: {str(exc)[:80]}); "
                        "fix: pass the tune folder `kdsearch run` printed, or start the search again") from None
    space = parse_space(read_yaml(text, str(meta_file)), source, text)
    check_space(space)  # the data or a teacher may have changed since
    with ray_starting(options):  # Ray starts while the teacher phase runs
        return _resume(space, options, path, parent_id, exp_id)


def _resume(space: Space, options: SearchOptions, path: str, parent_id: str, exp_id: str) -> SearchResult:
    """:func:`resume_search` once its resume file is read: the teacher phase, then the trials."""
    from kdsearch.search.tracking import client

    context = prepare_context(space)
    mlflow_client = client(options.tracking_uri)
    log.info(f"resuming search {options.name} from {path}")
    mlflow_client.update_run(parent_id, status="RUNNING")  # KILLED by an interrupt, or RUNNING after a crash
    return _drive(space, options, mlflow_client, exp_id, parent_id, str(path), restore=True, context=context)


def check_space(space: Space) -> None:
    """The probes ``kdsearch validate`` prints (data, teachers, hints, constraints): a bad space is
    one line before any store, run or Ray session exists."""
    from kdsearch.trainers.probes import probe_space

    probe_space(space)


def prepare_context(space: Space) -> Any:
    """The data and teachers themselves (the teacher phase), once for all trials, after :func:`check_space`."""
    from kdsearch.trainers.trial import prepare

    log.info("preparing data and teacher (once for all trials)...")
    context = prepare(space)
    log.info(f"teacher {context.targets.description}: val_acc {context.targets.val_acc:.4f}")
    return context


def _drive(space: Space, options: SearchOptions, mlflow_client, exp_id: str, parent_id: str, path: str,
           restore: bool, context: Any) -> SearchResult:
    import ray
    from ray import tune

    from kdsearch.search import finalize
    from kdsearch.search.latency import latency_measurer
    from kdsearch.search.pareto import reference_point
    from kdsearch.search.recorder import SearchRecorder, is_final
    from kdsearch.search.searchers import KDSearch, make_sampler
    from kdsearch.search.interrupts import sigterm_as_sigint
    from kdsearch.search.tracking import LATENCY_TAG, PARTIAL_TAG, ui_link

    started_ray, measurer, ray_start = False, None, take_ray_start(options)
    try:
        started_ray = ray_start.wait()
        max_t = max_epochs(space, options.epochs)
        reference = reference_point(space.objectives, space.reference_point, space.constraints, context.targets.footprint)
        recorder = SearchRecorder(mlflow_client, exp_id, parent_id, space.objectives, reference, options.num_samples)
        measurer = latency_measurer(space, context.data.input_shape, context.data.num_classes,
                                    min(options.max_concurrent, options.num_samples), options.cpus_per_trial,
                                    options.gpus_per_trial)
        recorder.write.log(parent_id, tags={LATENCY_TAG: "trial" if measurer is None else "measurer"})
        trainable = tune.with_resources(
            tune.with_parameters(distil_trainable, space=space, context=ray.put(context), measurer=measurer,
                                 seed=options.seed, epochs=options.epochs,
                                 report_at=tuple(report_points(options.scheduler, max_t, options.grace_period,
                                                               options.reduction_factor))),
            {"cpu": options.cpus_per_trial, "gpu": options.gpus_per_trial},
        )
        if restore:
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
            tuner._local_tuner.get_run_config().callbacks = [recorder]  # the pickled recorder is stale
        else:
            searcher = KDSearch(space, make_sampler(options.searcher, options.seed, options.num_samples), is_final,
                                ConstraintCheck(space, context.data.input_shape, context.data.num_classes))
            recorder.rejected = lambda: len(searcher.rejected)
            scheduler = make_scheduler(options.scheduler, space, max_t, options.grace_period, options.reduction_factor)
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=options.num_samples,
                                            max_concurrent_trials=options.max_concurrent,
                                            reuse_actors=True),  # a new actor per trial doubles wall time on small trials
                run_config=tune.RunConfig(
                    name=Path(path).name, storage_path=str(Path(path).parent) if "://" not in path else path.rsplit("/", 1)[0],
                    verbose=0, callbacks=[recorder],
                    stop=EpochBudget(options.budget_epochs) if options.budget_epochs else None,
                    failure_config=tune.FailureConfig(max_failures=options.max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                ),
            )
        budget = tuner._local_tuner.get_run_config().stop  # a restored search's own stopper
        with warnings.catch_warnings(), sigterm_as_sigint() as signals:
            warnings.simplefilter("ignore")
            results = tuner.fit()
        recorder.adopt(results)  # trials that ended before a resume
        # Tune returns from fit with trials still in flight on SIGINT (or our SIGTERM), and when
        # the epoch budget is spent: the first is an interrupt, the second the search's own end
        budget_spent = isinstance(budget, EpochBudget) and budget.stop_all()
        stopped_by = signals.name or ("SIGINT" if recorder.running and not budget_spent else None)
        if stopped_by:
            interrupted = recorder.interrupt()
            log.info(f"{stopped_by}: stopped; {len(interrupted)} trials in flight ({', '.join(interrupted) or 'none'}) "
                     "end as interrupted, the front so far is marked partial")
        else:
            if budget_spent and recorder.running:
                ended = recorder.stop_in_flight(results, f"the search's {budget.budget:g}-epoch budget was spent")
                log.info(f"epoch budget spent: {len(ended)} trials in flight ({', '.join(ended)}) end as pruned")
            if lost := recorder.close_lost():
                log.info(f"{len(lost)} runs ({', '.join(lost)}) started after Tune last saved its state: "
                         "not resumable, marked lost")
        recorder.flush()  # every trial's writes are in the store (and its row has its run id) before the front
        mlflow_client.set_tag(parent_id, PARTIAL_TAG, str(bool(stopped_by)).lower())
        result = finalize.finish(space, context, recorder, mlflow_client, parent_id, options.log_models,
                                 partial=bool(stopped_by))
    except BaseException as exc:
        # a search that did not finish is never left RUNNING: Ctrl-C outside Tune's loop is KILLED
        # (resumable), anything else FAILED; the trials' writes go first
        if "recorder" in locals():
            with contextlib.suppress(Exception):
                recorder.close()
        mlflow_client.set_terminated(parent_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        if isinstance(exc, KeyboardInterrupt):
            log.info(f"interrupted; resume with: kdsearch resume {path}")
        raise
    finally:
        if "recorder" in locals():
            with contextlib.suppress(Exception):
                recorder.close()  # what the trials logged reaches the store, whatever happened
            shutil.rmtree(recorder.students_dir, ignore_errors=True)
        if started_ray:
            ray.shutdown()
        elif measurer is not None:
            with contextlib.suppress(Exception):
                ray.kill(measurer)
        ray_start.release()
    mlflow_client.set_terminated(parent_id, "KILLED" if stopped_by else "FINISHED")
    if stopped_by:
        log.info(f"resume with: kdsearch resume {path}")
    log.info(f"MLflow: {options.tracking_uri}, experiment {options.experiment!r}, run {parent_id}")
    log.info(f"open it: kdsearch ui --tracking-uri {options.tracking_uri}  then  {ui_link('http://127.0.0.1:5000', exp_id)}")
    return SearchResult(exp_id, options.experiment, parent_id, options.tracking_uri, dict(space.objectives),
                        result["reference"], result["hypervolume"], rows_frame(result["front"], space.objectives),
                        rows_frame(list(recorder.rows.values()), space.objectives), path, recorder.counts(),
                        result["teacher_passes"], interrupted=stopped_by)
