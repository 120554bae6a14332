"""Bad input, table-driven: exit code 2, one line naming the field and the fix, no traceback, nothing created.

Each case runs ``kdsearch`` in-process (``main(argv)``) from an empty folder; a space file or a
module it needs is written beside it first.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from kdsearch.search.cli import main

GOOD = "teacher: {family: mlp, epochs: 1}\nstudents:\n  mlp: {width: 16}\n"

DIGITS = "data: {source: digits}\nstudents:\n  mlp: {width: 16}\n"
NPZ = "data: {source: npz, path: d.npz}\nstudents:\n  mlp: {width: 16}\n"
TS_TEACHER = "teacher: {path: teacher.pt}\n"

#: id -> (space file text or None, argv after the command's name, text the error line must hold)
CASES = {
    "yaml-duplicate-key": ("teacher: {family: mlp}\nteacher: {family: cnn}\nstudents: {mlp: {}}\n",
                           ["validate", "space.yaml"], "duplicate key 'teacher' at line 2"),
    "yaml-alias-bomb": ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 12)}]\n" for p, c in zip("abcdefghi", "bcdefghij")) + GOOD,
        ["validate", "space.yaml"], "more than 100 aliases"),
    "yaml-syntax": ("teacher: {family: mlp\n", ["validate", "space.yaml"], "space.yaml"),
    "yaml-not-a-mapping": ("- a\n- b\n", ["validate", "space.yaml"], "not a mapping"),
    "binary-file": (b"\x00\x01\x02PK\x03\x04", ["validate", "space.yaml"], "binary, not YAML"),
    "not-utf8": (b"name: caf\xe9\n", ["validate", "space.yaml"], "not UTF-8"),
    "too-big": ("# " + "x" * (1 << 20) + "\n" + GOOD, ["validate", "space.yaml"], "over the 1,048,576-byte limit"),
    "missing-file": (None, ["validate", "nope.yaml"], "nope.yaml: cannot read the space file"),
    "unknown-section": (GOOD + "extras: 1\n", ["validate", "space.yaml"], "extras: unknown section"),
    "unknown-knob": (GOOD + "train: {learning_rate: 0.1}\n", ["validate", "space.yaml"], "train.learning_rate"),
    "knob-out-of-range": (GOOD + "train: {lr: -1}\n", ["validate", "space.yaml"], "train.lr"),
    "low-above-high": (GOOD + "train: {lr: {low: 0.1, high: 0.01}}\n", ["validate", "space.yaml"], "train.lr"),
    "unknown-family": ("teacher: {family: mlp}\nstudents: {transformer: {}}\n", ["validate", "space.yaml"],
                       "students.transformer"),
    "unknown-quantizer": (GOOD + "compress: {quantize: int4}\n", ["validate", "space.yaml"], "compress.quantize"),
    "unknown-method": (GOOD + "distill: {method: crd}\n", ["validate", "space.yaml"], "distill.method"),
    "unknown-mix": (GOOD + "distill: {teacher_mix: vote}\n", ["validate", "space.yaml"], "distill.teacher_mix"),
    "teacher-and-teachers": (GOOD + "teachers: [{family: mlp}]\n", ["validate", "space.yaml"], "teachers"),
    "weights-per-teacher": (GOOD + "distill: {teacher_mix: weighted, teacher_weights: [0.5, 0.5]}\n",
                            ["validate", "space.yaml"], "distill.teacher_weights"),
    "views-out-of-range": (GOOD + "distill: {teacher_views: 0}\n", ["validate", "space.yaml"], "distill.teacher_views"),
    "augment-unknown": (GOOD + "train: {augment: {rotate: 10}}\n", ["validate", "space.yaml"], "train.augment.rotate"),
    "stdlib-ref-os-system": (GOOD + "data: {source: 'os:system', options: {command: 'touch pwned'}}\n",
                             ["validate", "space.yaml"], "'os:system' is in the Python standard library"),
    "stdlib-ref-subprocess": (GOOD.replace("students:\n  mlp: {width: 16}", "students:\n  m: {builder: 'subprocess:run'}"),
                              ["validate", "space.yaml"], "'subprocess:run' is in the Python standard library"),
    "stdlib-ref-eval": (GOOD + "compress: {quantize: 'builtins:eval'}\n", ["validate", "space.yaml"],
                        "'builtins:eval' is in the Python standard library"),
    "ref-missing-module": (GOOD + "data: {source: 'no_such_module_xyz:load'}\n", ["validate", "space.yaml"],
                           "cannot import 'no_such_module_xyz:load'"),
    "objective-unknown": (GOOD + "objectives: {accuracy: max}\n", ["validate", "space.yaml"], "objectives.accuracy"),
    "constraint-negative": (GOOD + "constraints: {max_params: -5}\n", ["validate", "space.yaml"], "constraints.max_params"),
    "objectives-empty": (GOOD + "objectives: {}\n", ["validate", "space.yaml"], "objectives: is empty"),
    "run-one-objective": (GOOD + "objectives: {val_acc: max}\n", ["run", "space.yaml"], "objectives: only val_acc"),
    "name-is-a-path": (GOOD + "name: ../../x\n", ["validate", "space.yaml"], "name: '../../x' is not a plain name"),
    "hint-stage-missing": ("teacher: {family: cnn, epochs: 1, config: {stages: 3, channels: 8}}\nstudents: {mlp: {}}\n"
                           "distill: {hint_stages: '0,99', hint_weight: 0.1}\n", ["trial", "space.yaml", "--epochs", "1"],
                           "distill.hint_stages: '0,99' names stage 99 but teacher 0 has 3 stages"),
    "trial-epochs-0": (None, ["trial", "--epochs", "0"], "--epochs 0: must be at least 1"),
    "trial-epochs-negative": (None, ["trial", "--epochs", "-1"], "--epochs -1: must be at least 1"),
    "run-address-unreachable": (None, ["run", "--address", "127.0.0.1:1"], "address (--address): 127.0.0.1:1 does not answer"),
    "run-constraints-unsatisfiable": (GOOD + "constraints: {max_params: 1}\n", ["run", "space.yaml"],
                                      "constraints: none of 200 random students of the space meets them"),
    "run-data-missing": (GOOD + "data: {source: npz, path: nope.npz}\n", ["run", "space.yaml"],
                         "data.path: 'nope.npz' does not exist"),
    "run-num-samples-0": (None, ["run", "--num-samples", "0"], "num_samples (--num-samples): must be at least 1"),
    "run-budget-negative": (None, ["run", "--budget-epochs", "-5"], "budget_epochs (--budget-epochs): must be above 0"),
    "run-grace-0": (None, ["run", "--grace-period", "0"], "grace_period (--grace-period): must be above 0"),
    "run-eta-1": (None, ["run", "--reduction-factor", "1"], "reduction_factor (--reduction-factor): must be at least 2"),
    "run-cpus-negative": (None, ["run", "--cpus-per-trial", "-1"], "cpus_per_trial (--cpus-per-trial): must be above 0"),
    "run-gpus-missing": (None, ["run", "--gpus-per-trial", "64"], "gpus_per_trial (--gpus-per-trial): 64 but"),
    "run-epochs-0": (None, ["run", "--epochs", "0"], "epochs (--epochs): must be at least 1"),
    "run-experiment-empty": (None, ["run", "--experiment", ""], "experiment (--experiment)"),
    "run-name-path": (None, ["run", "--name", "../../x"], "name (--name)"),
    "run-max-failures-negative": (None, ["run", "--max-failures", "-1"], "max_failures (--max-failures)"),
    "trial-params-not-json": (None, ["trial", "--params", "{nope"], "--params: not valid JSON"),
    "trial-params-unknown-knob": (None, ["trial", "--params", '{"train.momentumm": 0.5}'], "params.train.momentumm"),
    "resume-no-folder": (None, ["resume", "no-such-folder"], "no kdsearch.json there"),
    "resume-truncated-state": (None, ["resume", "tune"], "kdsearch.json: not a kdsearch resume file (JSONDecodeError"),
    "resume-state-not-a-search": (None, ["resume", "tune"], "kdsearch.json: not a kdsearch resume file (KeyError"),
    "export-bad-limit": (None, ["export", "--max-latency-ms", "-1"], "--max-latency-ms"),
    "export-no-store": (None, ["export", "--tracking-uri", "sqlite:///nowhere/mlflow.db"], "--tracking-uri"),
    # the probes: data files, teacher files and student sizes, checked by `validate` and first thing by
    # `run` and `trial` (trainers.probes.probe_space), nothing trained or allocated
    "npz-length-mismatch": (NPZ + TS_TEACHER, ["validate", "space.yaml"], "x_train has 40 rows but y_train has 30"),
    "npz-labels-with-gaps": (NPZ + TS_TEACHER, ["validate", "space.yaml"], "labels reach 9 but"),
    "npz-labels-negative": (NPZ + TS_TEACHER, ["validate", "space.yaml"], "y_train holds negative labels"),
    "npz-labels-float": (NPZ + TS_TEACHER, ["validate", "space.yaml"], "y_train holds non-integer values"),
    "npz-single-class": (NPZ + TS_TEACHER, ["validate", "space.yaml"], "y_train holds a single class (0)"),
    "npz-nan": (NPZ + TS_TEACHER, ["validate", "space.yaml"], "samples hold NaN or infinite values"),
    "npz-object-array": (NPZ + TS_TEACHER, ["validate", "space.yaml"], "x_train is an object array"),
    "npz-not-a-zip": (NPZ + TS_TEACHER, ["validate", "space.yaml"], "cannot read d.npz as .npz"),
    "teacher-pt2-garbage": (DIGITS + "teacher: {path: teacher.pt2}\n", ["validate", "space.yaml"],
                            "teacher.path: cannot load teacher.pt2 as a torch.export program"),
    "teacher-pt2-truncated": (DIGITS + "teacher: {path: teacher.pt2}\n", ["validate", "space.yaml"],
                              "teacher.path: cannot load teacher.pt2 as a torch.export program"),
    "teacher-torchscript-garbage": (DIGITS + TS_TEACHER, ["validate", "space.yaml"], "teacher.path: cannot load teacher.pt as TorchScript"),
    "teacher-file-missing": (DIGITS + "teacher: {path: nope.pt}\n", ["validate", "space.yaml"], "teacher.path: no file at nope.pt"),
    "teacher-module-missing": (DIGITS + "teacher: {module: 'no_such_module_xyz:build'}\n", ["validate", "space.yaml"],
                               "teacher.module: cannot import 'no_such_module_xyz:build'"),
    "teacher-attr-missing": (DIGITS + "teacher: {module: 'torch.nn:NoSuchTeacher'}\n", ["validate", "space.yaml"],
                             "teacher.module: cannot import 'torch.nn:NoSuchTeacher'"),
    "teacher-state-dict-pickle-code": (DIGITS + "teacher: {module: 'torch.nn:Identity', state_dict: weights.pt}\n",
                                       ["validate", "space.yaml"], "teacher.state_dict: weights.pt refused as unsafe: it names "),
    "teacher-state-dict-garbage": (DIGITS + "teacher: {module: 'torch.nn:Identity', state_dict: weights.pt}\n",
                                   ["validate", "space.yaml"], "teacher.state_dict: cannot read weights.pt as a state_dict"),
    "teacher-7-outputs-on-10-classes": (DIGITS + TS_TEACHER, ["validate", "space.yaml"],
                                        "teacher: outputs shape (1, 7) but the data has 10 classes"),
    "teachers-second-wrong-width": ("data: {source: digits}\nstudents: {mlp: {width: 16}}\n"
                                    "teachers: [{path: teacher.pt}, {path: teacher7.pt}]\n", ["validate", "space.yaml"],
                                    "teachers[1]: outputs shape (1, 7)"),
    "student-builder-width-1e9": (DIGITS.replace("mlp: {width: 16}", "wide: {builder: 'kd_bad_builder:build', width: 1000000000}")
                                  + TS_TEACHER, ["validate", "space.yaml"],
                                  "students.wide.width: 1000000000 makes a student of 75,000,000,010 params, over the 2,000,000,000 params"),
    "student-cnn-every-knob-at-upper-bound": (DIGITS.replace("mlp: {width: 16}", "cnn: {stages: 5, channels: 1024, width_mult: 4.0, "
                                                             "blocks: 8, kernel: 7}") + TS_TEACHER,
                                              ["validate", "space.yaml"], "over the 2,000,000,000 params a trial can build"),
    "run-tracking-folder-missing": (None, ["run", "--tracking-uri", "sqlite:///nowhere/mlflow.db"],
                                    "tracking_uri (--tracking-uri): its folder"),
    "pareto-no-store": (None, ["pareto", "--tracking-uri", "sqlite:///nowhere/mlflow.db"], "--tracking-uri"),
}

#: the files a case needs beside its space file: case -> write(folder)
FILES: dict[str, Callable[[Path], None]] = {}


def _npz(**arrays: np.ndarray) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        np.savez(folder / "d.npz", **arrays)
        _teacher(6, 2)(folder)
    return write


def _teacher(features: int, outputs: int, name: str = "teacher.pt") -> Callable[[Path], None]:
    """A TorchScript linear teacher: loads in milliseconds, nothing trained."""
    def write(folder: Path) -> None:
        torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(features, outputs))).save(str(folder / name))
    return write


def _raw(name: str, content: bytes, then: Callable[[Path], None] = lambda folder: None) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        (folder / name).write_bytes(content)
        then(folder)
    return write


class _RunsCode:
    """Pickles as a call of os.system: what a hostile state_dict holds."""

    def __reduce__(self):
        return os.system, ("touch pwned",)


def _truncated_pt2(folder: Path) -> None:
    path = folder / "teacher.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(64, 10), (torch.zeros(1, 64),)), str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


_X = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
_Y = np.arange(40) % 2
_X_NAN = _X.copy()
_X_NAN[[3, 7, 9], 2] = [np.nan, np.inf, -np.inf]
_BUILDER = (b"from torch import nn\n\n"
            b"def build(config, input_shape, num_classes):\n"
            b"    return nn.Sequential(nn.Flatten(), nn.Linear(64, int(config['width'])), nn.Linear(int(config['width']), num_classes))\n")

FILES.update({
    "npz-length-mismatch": _npz(x_train=_X, y_train=_Y[:30]),
    "npz-labels-with-gaps": _npz(x_train=_X, y_train=np.where(_Y == 1, 9, 0)),
    "npz-labels-negative": _npz(x_train=_X, y_train=_Y - 1),
    "npz-labels-float": _npz(x_train=_X, y_train=_Y + 0.5),
    "npz-single-class": _npz(x_train=_X, y_train=np.zeros(40, dtype=np.int64)),
    "npz-nan": _npz(x_train=_X_NAN, y_train=_Y),
    "npz-object-array": _npz(x_train=np.array([_X[0], "x"], dtype=object), y_train=_Y[:2]),
    "npz-not-a-zip": _raw("d.npz", b"not a zip archive at all", _teacher(6, 2)),
    "teacher-pt2-garbage": _raw("teacher.pt2", os.urandom(256)),
    "teacher-pt2-truncated": _truncated_pt2,
    "teacher-torchscript-garbage": _raw("teacher.pt", b"PK\x03\x04 garbage, not TorchScript"),
    "teacher-state-dict-pickle-code": lambda folder: torch.save({"w": _RunsCode()}, folder / "weights.pt"),
    "teacher-state-dict-garbage": _raw("weights.pt", os.urandom(128)),
    "teacher-7-outputs-on-10-classes": _teacher(64, 7),
    "teachers-second-wrong-width": lambda folder: (_teacher(64, 10)(folder), _teacher(64, 7, "teacher7.pt")(folder)),
    "student-builder-width-1e9": lambda folder: (_raw("kd_bad_builder.py", _BUILDER)(folder), _teacher(64, 10)(folder)),
    "student-cnn-every-knob-at-upper-bound": _teacher(64, 10),
    "resume-truncated-state": lambda folder: ((folder / "tune").mkdir(), (folder / "tune" / "kdsearch.json").write_text('{"options": {"num_sam')),
    "resume-state-not-a-search": lambda folder: ((folder / "tune").mkdir(), (folder / "tune" / "kdsearch.json").write_text('{"name": "x"}')),
})

def test_non_finite_inputs_are_refused_with_the_sample_count(tmp_path):
    import numpy as np

    import kdsearch
    from kdsearch.trainers.data import load_data

    x = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
    x[[3, 7, 9], 2] = [np.nan, np.inf, -np.inf]
    np.savez(tmp_path / "d.npz", x_train=x, y_train=np.arange(40) % 2)
    space = kdsearch.load_space({"data": {"source": "npz", "path": str(tmp_path / "d.npz")},
                                 "teacher": {"family": "mlp"}, "students": {"mlp": {}}})
    with pytest.raises(kdsearch.SpaceError, match=r"^data: \d of \d+ (training|validation) samples hold NaN or infinite"):
        load_data(space.data)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_creates_nothing(case, tmp_path, monkeypatch, capsys):
    space, argv, needle = CASES[case]
    monkeypatch.chdir(tmp_path)
    if space is not None:
        (tmp_path / "space.yaml").write_bytes(space if isinstance(space, bytes) else space.encode())
    if case in FILES:
        FILES[case](tmp_path)
        monkeypatch.syspath_prepend(str(tmp_path))  # a builder module written beside the space
    before = set(os.listdir(tmp_path))
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("kdsearch: error: "), err
    assert needle in err[0], err[0]
    assert "Traceback" not in err[0] and "fix:" in err[0]
    assert set(os.listdir(tmp_path)) == before, "nothing is created"
