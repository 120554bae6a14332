"""The cheap probes (``kdsearch.trainers.probes``): what ``validate`` will print, found without training."""

from __future__ import annotations

import numpy as np
import torch

import kdsearch
from kdsearch.trainers.measure import count_macs, count_params
from kdsearch.trainers.probes import probe_space
from kdsearch.trainers.trial import expected_footprint, pruned_structure


def test_probe_reports_data_teacher_students_and_imports_without_training(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x_train=rng.normal(size=(50, 6)).astype(np.float32), y_train=np.arange(50) % 3)
    torch.export.save(torch.export.export(torch.nn.Linear(6, 3), (torch.zeros(1, 6),)), str(tmp_path / "t.pt2"))
    (tmp_path / "kd_probe_builder.py").write_text(
        "from torch import nn\n\ndef build(config, input_shape, num_classes):\n"
        "    return nn.Linear(input_shape[0], num_classes)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    space = kdsearch.load_space({"data": {"source": "npz", "path": str(tmp_path / "d.npz")},
                                 "teacher": {"path": str(tmp_path / "t.pt2")},
                                 "students": {"lin": {"builder": "kd_probe_builder:build"}},
                                 "constraints": {"max_params": 100}})
    report = probe_space(space)
    assert (report.data.input_shape, report.data.num_classes) == ((6,), 3)
    assert report.data.train_samples + report.data.val_samples == 50
    assert report.teachers[0].outputs == 3
    assert report.imports == ("kd_probe_builder",)
    assert report.fitting == {"params": 21, "macs": 18}
    lines = "\n".join(report.lines())
    assert "3 classes" in lines and "t.pt2 (torch.export), 3 outputs" in lines and "kd_probe_builder" in lines


def test_meta_footprints_equal_the_real_pruned_students(digits_space):
    """The constraint check's footprints (meta device, channels ranked by position) are the real ones."""
    checked = set()
    for seed in range(12):
        config = digits_space.resolve(digits_space.sample_random(seed))
        if config.compress.prune_ratio == 0 or config.family in checked:
            continue
        checked.add(config.family)
        example = torch.zeros(1, 1, 8, 8)
        real = pruned_structure(digits_space.build_student(config, (1, 8, 8), 10), config, example)
        assert expected_footprint(digits_space, config, (1, 8, 8), 10) == {
            "params": count_params(real), "macs": count_macs(real, example)}
    assert checked, "some sampled student is pruned"
