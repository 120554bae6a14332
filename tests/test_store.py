"""The teacher-output store: memory-mapped, content-hashed, built once, reused by later searches."""

from __future__ import annotations

import pickle

import torch

import kdsearch
from kdsearch.trainers.teaching import Teaching
from kdsearch.trainers.trial import prepare, run_trial

TEACHER = {"family": "cnn", "config": {"stages": 3, "channels": 16}, "epochs": 3}


def hinted_space(hint_stages="last", name="store"):
    return kdsearch.load_space({
        "name": name, "teacher": TEACHER, "students": {"cnn": {"stages": 2, "channels": 8}},
        "distill": {"hint_stages": hint_stages, "hint_weight": 1.0}, "train": {"epochs": 1},
    })


def mapped_file(tensor: torch.Tensor) -> str:
    """The file whose memory map holds ``tensor``'s data ('' when it lives in ordinary memory); Linux's /proc/self/maps."""
    address = tensor.data_ptr()
    for line in open("/proc/self/maps"):
        fields = line.split()
        start, end = (int(a, 16) for a in fields[0].split("-"))
        if start <= address < end:
            return fields[5] if len(fields) > 5 else ""
    return ""


def test_trial_targets_come_from_the_memory_mapped_store_and_equal_a_teacher_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("KDSEARCH_CACHE_DIR", str(tmp_path))
    space = hinted_space("last")
    context = prepare(space)
    targets = context.targets
    assert mapped_file(targets.logits).endswith("logits.npy") and targets.logits.dtype == torch.float16
    last = len(targets.feature_shapes) - 1
    assert [f is not None for f in targets.features] == [i == last for i in range(last + 1)], "only the hinted stage"
    x = context.data.train.x
    with torch.no_grad():
        logits, stages = targets.model.forward_stages(x)
    torch.testing.assert_close(targets.logits.float(), logits.half().float())
    torch.testing.assert_close(targets.features[last].float(), stages[last].half().float())
    # a trial with hints reads them from the store: no teacher pass at all
    config = space.resolve(space.sample_random(0))
    teaching = Teaching(context, config, "cpu", seed=0)
    idx = torch.arange(32)
    _, teachers, _ = teaching.batch(idx, x[idx], context.data.train.y[idx], True)
    torch.testing.assert_close(teachers.outputs[0].features[last], stages[last][idx].half().float())
    assert teaching.passes == 0 and teaching.hint_batches_stored == teaching.hint_batches == 1
    result = run_trial(space, space.sample_random(0), context=context, artifact_dir=tmp_path / "trial")
    assert result["teacher_passes"] == 0
    # pickled (as into Ray's object store) it travels as numpy arrays and comes back equal
    back = pickle.loads(pickle.dumps(context))
    assert torch.equal(back.targets.logits, targets.logits) and torch.equal(back.data.train.x, x)


def test_a_second_search_with_the_same_data_and_teacher_reuses_the_store(tmp_path, monkeypatch):
    monkeypatch.setenv("KDSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    space = hinted_space("none", name="reuse")
    runs = [kdsearch.run_search(space, num_samples=1, scheduler="none", log_models=False, seed=seed,
                                tracking_uri=f"sqlite:///{tmp_path}/mlflow.db") for seed in (0, 1)]
    train = len(prepare(space).data.train)
    assert [r.teacher_passes for r in runs] == [train, 0], "the first search fills the store, the second runs no pass"
    assert len(list((tmp_path / "cache" / "targets").glob("*/meta.json"))) == 1


def test_without_a_gpu_here_the_teacher_phase_runs_as_a_gpu_task_on_the_cluster(tmp_path, monkeypatch):
    """A cluster with a GPU (here a logical one: the task finds no CUDA and uses the CPU) prepares the context;
    the driver's own prepare is never called, and the arrays come back equal."""
    import ray

    from kdsearch.search.teacher_phase import prepare_where_the_gpu_is, wants_gpu

    monkeypatch.setenv("KDSEARCH_CACHE_DIR", str(tmp_path))
    space = hinted_space("none", name="gpu-task")
    assert wants_gpu(space) and not wants_gpu(kdsearch.load_space({**space_dict(space), "teacher": {**TEACHER, "device": "cpu"}}))

    def not_here(_space):
        raise AssertionError("the driver has no GPU: the phase belongs on the cluster's")

    ray.init(num_cpus=1, num_gpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"KDSEARCH_CACHE_DIR": str(tmp_path)}})
    try:
        remote = prepare_where_the_gpu_is(space, "cluster", not_here)
    finally:
        ray.shutdown()
    local = prepare(space)
    assert remote.targets.key == local.targets.key and torch.equal(remote.targets.logits, local.targets.logits)
    assert prepare_where_the_gpu_is(space, None, lambda s: "local") == "local", "no cluster: the driver prepares"


def space_dict(space):
    import yaml

    return yaml.safe_load(space.text)
