"""The space schema accepts what it should, rejects the rest naming the field, and builds every family."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from kdsearch.spaces import DEFAULT_SPACE, Space, SpaceError, load_space, parse_space
from kdsearch.spaces.knobs import Choice, FloatRange, IntRange, PinnedSuggester, RandomSuggester

from conftest import ROOT, write_module


def raw_default() -> dict:
    return yaml.safe_load(DEFAULT_SPACE.read_text())


def test_builtin_space_loads_with_all_families():
    space = load_space()
    assert set(space.students) == {"mlp", "cnn", "mobilenet"}
    assert space.objectives == {"val_acc": "max", "latency_ms": "min", "params": "min"}
    assert isinstance(space.students["cnn"].knobs["kernel"], Choice)
    assert isinstance(space.students["mlp"].knobs["width"], IntRange) and space.students["mlp"].knobs["width"].log
    assert isinstance(space.sections["train"]["lr"], FloatRange)


@pytest.mark.parametrize(
    "patch, field",
    [
        (lambda r: r["students"]["cnn"].update(channels="wide"), "students.cnn.channels"),
        (lambda r: r["students"]["cnn"].update(kernel={"choice": [3, 4]}), "students.cnn.kernel.choice[1]"),
        (lambda r: r["students"]["mlp"].update(depth={"low": 3, "high": 1}), "students.mlp.depth"),
        (lambda r: r["students"]["mlp"].update(widht=32), "students.mlp.widht"),
        (lambda r: r["students"].update(resnet={}), "students.resnet"),
        (lambda r: r["train"].update(lr={"low": 0, "high": 1, "log": True}), "train.lr.low"),
        (lambda r: r["distill"].update(alpha=1.5), "distill.alpha"),
        (lambda r: r["objectives"].update(accuracy="max"), "objectives.accuracy"),
        (lambda r: r["objectives"].update(params="smallest"), "objectives.params"),
        (lambda r: r["constraints"].update(max_params="big"), "constraints.max_params"),
        (lambda r: r["teacher"].update(path="t.pt2"), "teacher"),
        (lambda r: r["data"].update(val_fraction=2), "data.val_fraction"),
        (lambda r: r.update(studnets={}), "studnets"),
    ],
)
def test_schema_rejects_naming_the_field(patch, field):
    raw = raw_default()
    patch(raw)
    with pytest.raises(SpaceError) as err:
        parse_space(raw)
    assert err.value.path == field
    assert "\n" not in str(err.value) and "fix:" in str(err.value)


def test_validate_cli_bad_width_is_one_line_exit_2(tmp_path):
    raw = raw_default()
    raw["students"]["cnn"]["channels"] = "wide"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "kdsearch.search.cli", "validate", str(bad)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "students.cnn.channels" in lines[0] and "Traceback" not in proc.stderr


def test_validate_cli_prints_resolved_space():
    proc = subprocess.run([sys.executable, "-m", "kdsearch.search.cli", "validate"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["students"]["cnn"]["kernel"] == {"choice": [3, 5]}


def test_yaml_syntax_error_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("students:\n  cnn: {kernel: [3,\n")
    with pytest.raises(SpaceError, match="line"):
        load_space(bad)


WIDE = textwrap.dedent("""
    students:
      mlp: {depth: {low: 1, high: 4}, width: {low: 4, high: 512, log: true}, taper: {low: 0.3, high: 1.0},
            activation: {choice: [relu, gelu, silu, tanh]}, dropout: {low: 0.0, high: 0.5}}
      cnn: {stages: {low: 1, high: 4}, channels: {low: 4, high: 64}, width_mult: {low: 0.25, high: 2.0},
            blocks: {low: 1, high: 3}, kernel: {choice: [3, 5, 7]}, residual: {choice: [true, false]},
            batch_norm: {choice: [true, false]}, activation: {choice: [relu, gelu, silu]}}
      mobilenet: {stages: {low: 1, high: 4}, depth: {low: 1, high: 3}, expansion: {low: 1, high: 6},
                  kernel: {choice: [3, 5, 7]}, width_mult: {low: 0.25, high: 2.0}, channels: {low: 4, high: 32}}
    teacher: {family: cnn}
""")


@pytest.mark.parametrize("family", ["mlp", "cnn", "mobilenet"])
@pytest.mark.parametrize("input_shape", [(1, 8, 8), (3, 32, 32)])
def test_every_family_builds_and_runs_over_50_configs(family, input_shape):
    space = parse_space(yaml.safe_load(WIDE))
    suggester = PinnedSuggester({"student.family": family}, RandomSuggester(0))
    for _ in range(50):
        params = space.sample(suggester)
        config = space.resolve(params)
        model = space.build_student(config, input_shape, 10).eval()
        x = torch.randn(2, *input_shape)
        logits, stages = model.forward_stages(x)
        assert logits.shape == (2, 10)
        assert len(stages) == (config.student.get("depth") if family == "mlp" else config.student.get("stages"))
        assert torch.equal(model(x), logits)


def test_resolve_rejects_out_of_space_values(digits_space: Space):
    params = digits_space.sample(PinnedSuggester({"student.family": "cnn"}, RandomSuggester(0)))
    with pytest.raises(SpaceError) as err:
        digits_space.resolve({**params, "student.cnn.kernel": 7})
    assert err.value.path == "params.student.cnn.kernel"
    with pytest.raises(SpaceError) as err:
        digits_space.resolve({**params, "train.nope": 1})
    assert err.value.path == "params.train.nope"


def test_sampling_is_seeded_and_conditional(digits_space: Space):
    a, b = digits_space.sample_random(3), digits_space.sample_random(3)
    assert a == b
    family = a["student.family"]
    assert all(k.split(".")[1] == family for k in a if k.startswith("student.") and k != "student.family")


def test_user_family_from_module_attr(tmp_path, monkeypatch):
    write_module(tmp_path, "my_family", textwrap.dedent("""
        from torch import nn
        from kdsearch.spaces import StagedNet
        def build(config, input_shape, num_classes):
            width = config["width"]
            return StagedNet(nn.Flatten(), [nn.Sequential(nn.Linear(64, width), nn.ReLU())], nn.Linear(width, num_classes))
    """), monkeypatch)
    raw = raw_default()
    raw["students"] = {"tiny": {"builder": "my_family:build", "width": {"choice": [8, 16]}}}
    space = parse_space(raw)
    config = space.resolve(space.sample_random(0))
    model = space.build_student(config, (1, 8, 8), 10)
    assert model(torch.zeros(1, 1, 8, 8)).shape == (1, 10)
    raw["students"] = {"tiny": {"builder": "my_family:missing"}}
    with pytest.raises(SpaceError) as err:
        parse_space(raw)
    assert err.value.path == "students.tiny.builder"
