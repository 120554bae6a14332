"""Registries: one type for every extension point; space files select entries by name or module:attr."""

from __future__ import annotations

import doctest
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import kdsearch.spaces.registry as registry_module
from kdsearch.spaces import DEFAULT_SPACE, PinnedSuggester, RandomSuggester, SpaceError, load_space, parse_space
from kdsearch.spaces.families import KnobModel, StagedNet, register_family
from kdsearch.spaces.registry import FAMILIES, LOSSES, PRUNERS, QUANTIZERS, SOURCES, Registry, UnknownEntry
from kdsearch.trainers.checkpoint import load_student, read_artifact
from kdsearch.trainers.quantize import quant_info, register_quantizer
from kdsearch.trainers.trial import run_trial

from conftest import ROOT, write_module

# --------------------------------------------------------------------------- the Registry type


def test_registry_register_get_list_and_describe() -> None:
    reg: Registry = Registry("widget")

    @reg.register("b")
    def b() -> str:
        """Bee: the second widget.

        More text that is not listed."""
        return "b"

    assert reg.register("a", len) is len  # the direct form returns the entry
    assert reg.names() == ["a", "b"] and list(reg) == ["a", "b"] and len(reg) == 2
    assert "a" in reg and "c" not in reg
    assert reg.items() == [("a", len), ("b", b)]
    assert reg.describe("b") == "Bee: the second widget."
    reg.register("a", max)  # re-registering replaces
    assert reg.get("a") is max
    assert reg.get("numpy:mean") is __import__("numpy").mean  # a module:attr ref (the standard library is refused)
    reg.unregister("a")
    assert reg.names() == ["b"]
    with pytest.raises(ValueError, match="without ':'"):
        reg.register("x:y", len)


def test_unknown_name_is_one_line_space_error_and_key_error() -> None:
    reg: Registry = Registry("widget")
    reg.register("b", len)
    reg.register("a", len)
    with pytest.raises(SpaceError) as info:
        reg.get("zz", "section.widget")
    err = info.value
    assert isinstance(err, UnknownEntry) and isinstance(err, KeyError) and isinstance(err, ValueError)
    assert err.path == "section.widget" and err.problem == "unknown widget 'zz'"
    assert err.fix == "use one of: a, b, or a module:attr ref"
    assert str(err) == "section.widget: unknown widget 'zz'; fix: use one of: a, b, or a module:attr ref"
    assert str(pickle.loads(pickle.dumps(err))) == str(err)  # crosses process boundaries (Ray)
    with pytest.raises(SpaceError, match="cannot import"):
        reg.get("no_such_module_kd:thing", "section.widget")


def test_builtins_are_imported_on_first_lookup_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_module(tmp_path, "kd_lazy_builtins", textwrap.dedent("""
        from kdsearch.spaces.registry import REGISTRIES
        LAZY = REGISTRIES["lazy"]

        @LAZY.register("builtin")
        def builtin():
            '''The built-in one.'''
    """), monkeypatch)
    lazy: Registry = Registry("lazy thing", "kd_lazy_builtins")
    monkeypatch.setitem(registry_module.REGISTRIES, "lazy", lazy)
    assert "kd_lazy_builtins" not in sys.modules
    lazy.register("mine", len)  # the builtins load first, so a user's entry could replace one of them
    assert "kd_lazy_builtins" in sys.modules
    assert lazy.names() == ["builtin", "mine"] and lazy.describe("builtin") == "The built-in one."


def test_registry_doctest() -> None:
    result = doctest.testmod(registry_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_spaces_import_loads_no_trainers() -> None:
    code = ("import sys, kdsearch.spaces; "
            "bad = [m for m in sys.modules if m.startswith(('kdsearch.trainers', 'torch_pruning', 'ray'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_every_extension_point_has_a_registry() -> None:
    assert {"cnn", "mlp", "mobilenet"} <= set(FAMILIES)
    assert {"kd", "hint"} <= set(LOSSES)
    assert {"none", "dynamic_int8", "static_int8"} <= set(QUANTIZERS)
    assert {"l1", "l2", "taylor"} <= set(PRUNERS)
    assert {"digits", "npz", "cifar10", "image_folder"} <= set(SOURCES)


# --------------------------------------------------------------------------- kdsearch list


class TinyConfig(KnobModel):
    width: int = 8


@pytest.fixture
def test_family():
    @register_family("kd_test_family", TinyConfig)
    def build_tiny(cfg: TinyConfig, input_shape, num_classes):
        """A one-layer test student."""
        return StagedNet(nn.Flatten(), [nn.Linear(64, cfg.width)], nn.Linear(cfg.width, num_classes))

    yield "kd_test_family"
    FAMILIES.unregister("kd_test_family")


def test_list_families_in_process(test_family: str, capsys: pytest.CaptureFixture) -> None:
    from kdsearch.search.cli import main

    assert main(["list", "families"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    assert names == sorted(["cnn", "mlp", "mobilenet", test_family])
    assert any(line.startswith(test_family) and line.endswith("A one-layer test student.") for line in lines)
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines)  # every entry has a description


def test_list_all_kinds_in_a_subprocess() -> None:
    out = subprocess.run([sys.executable, "-m", "kdsearch.search.cli", "list"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for heading in ("families", "losses", "quantizers", "pruners", "sources"):
        assert any(line.startswith(heading + " ") for line in out.stdout.splitlines()), heading
    for name in ("mobilenet", "hint", "static_int8", "taylor", "image_folder"):
        assert f"  {name} " in out.stdout, name


# --------------------------------------------------------------------------- a space selecting user entries

#: a stand-in quantizer: rounds every float weight to float16 precision (exactly representable afterwards)
QUANT_MODULE = textwrap.dedent('''
    import torch
    from kdsearch.trainers.quantize import Quantizer

    class Float16Weights(Quantizer):
        """Float16-rounded weights (a test quantizer)."""

        calls = []  # calibration batches per call: 8 when quantizing, 0 when rebuilding to load

        def __init__(self, backend=None):
            super().__init__("none")  # no quantized engine involved

        def _convert(self, model, calib, example):
            type(self).calls.append(len(calib))
            with torch.no_grad():
                for t in model.state_dict().values():
                    if t.is_floating_point():
                        t.copy_(t.half().float())
            return model

    def random_importance():
        """Random channel ranking (a test criterion)."""
        import torch_pruning as tp
        random_importance.calls += 1
        return tp.importance.RandomImportance()

    random_importance.calls = 0

    def grad_importance():
        import torch_pruning as tp
        return tp.importance.MagnitudeImportance(p=1)

    grad_importance.needs_gradients = True

    class ZeroTerm(torch.nn.Module):
        calls = 0

        def forward(self, student, teacher, labels):
            type(self).calls += 1
            return student.logits.sum() * 0.0

    def zero_term(config, student_shapes, teacher_shapes):
        """A loss term adding nothing (a test term)."""
        return ZeroTerm()
''')


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    write_module(tmp_path, "kd_user_registry", QUANT_MODULE, monkeypatch)
    module = __import__("kd_user_registry")
    yield module
    sys.modules.pop("kd_user_registry", None)


def small_space(**compress) -> dict:
    raw = yaml.safe_load(DEFAULT_SPACE.read_text())
    raw["students"] = {"mlp": {"depth": 1, "width": 32}}
    raw["distill"]["hint_stages"] = "none"
    raw["train"]["batch_size"] = 64
    raw["compress"] = {"prune_ratio": 0.0, "finetune_epochs": 1, "calib_batches": 8, **compress}
    raw["measure"] = {"runtime": "torch"}  # a user's quantizer is a torch.ao one (Quantizer subclass)
    return raw


def sample(space):
    return space.sample(PinnedSuggester({}, RandomSuggester(0)))


def check_artifact(space, params, artifact: Path, quantizer: str, cls) -> nn.Module:
    """The artifact records ``quantizer``, reloads through it, and holds float16-exact weights."""
    assert read_artifact(artifact)["quantize"] == quantizer
    before = len(cls.calls)
    config = space.resolve(params)
    loaded, _ = load_student(artifact, lambda: space.build_student(config, (1, 8, 8), 10))
    assert cls.calls[before:] == [0]  # rebuilt by the same quantizer, uncalibrated, then the weights loaded
    assert quant_info(loaded).name == quantizer
    for name, t in loaded.state_dict().items():
        if t.is_floating_point():
            assert torch.equal(t, t.half().float()), name
    return loaded


def test_registered_quantizer_and_criterion_run_a_trial(user_module, digits_context, tmp_path: Path) -> None:
    cls = register_quantizer("kd_test_fp16")(type("Fp16", (user_module.Float16Weights,), {"calls": []}))
    PRUNERS.register("kd_test_random", user_module.random_importance)
    try:
        space = parse_space(small_space(quantize="kd_test_fp16", prune_ratio=0.5, prune_criterion="kd_test_random"))
        params = sample(space)
        assert params["compress.quantize"] == "kd_test_fp16"
        result = run_trial(space, params, context=digits_context, epochs=1, artifact_dir=tmp_path)
        assert cls.calls == [8, 8]  # the deployed structure before training, then the trained student
        assert user_module.random_importance.calls == 1  # the footprint prunes by l1; the trial by this criterion
        assert result["quant_backend"] == "none" and result["val_acc"] > 0.3
        loaded = check_artifact(space, params, tmp_path / "student.pt", "kd_test_fp16", cls)
        assert sum(p.numel() for p in loaded.parameters()) == result["params"]  # pruned: fewer than 64*32+32*10
        assert result["params"] < 64 * 32 + 32 + 32 * 10 + 10
    finally:
        QUANTIZERS.unregister("kd_test_fp16")
        PRUNERS.unregister("kd_test_random")


def test_module_attr_quantizer_from_a_yaml_space(user_module, digits_context, tmp_path: Path) -> None:
    ref = "kd_user_registry:Float16Weights"
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(small_space(quantize=ref)))
    space = load_space(path)
    params = sample(space)
    result = run_trial(space, params, context=digits_context, epochs=1, artifact_dir=tmp_path / "out")
    assert user_module.Float16Weights.calls == [8, 8] and result["val_acc"] > 0.3
    check_artifact(space, params, tmp_path / "out" / "student.pt", ref, user_module.Float16Weights)


def test_module_attr_criterion_and_gradients_flag(user_module) -> None:
    from kdsearch.trainers.compress import prune_student

    space = parse_space(small_space(prune_ratio=0.5, prune_criterion="kd_user_registry:random_importance"))
    config = space.resolve(sample(space))
    model = space.build_student(config, (1, 8, 8), 10)
    x = torch.randn(4, 1, 8, 8)
    prune_student(model, 0.5, config.compress.prune_criterion, x)
    assert user_module.random_importance.calls == 1 and model.stages[0][0].out_features == 16
    with pytest.raises(ValueError, match="loss_fn"):  # the ref's needs_gradients flag is honoured
        prune_student(space.build_student(config, (1, 8, 8), 10), 0.5, "kd_user_registry:grad_importance", x)


def test_loss_terms_come_from_the_registry(user_module) -> None:
    from kdsearch.spaces import DistillConfig
    from kdsearch.trainers.losses import Outputs, build_distill_loss, register_term

    register_term("kd_test_zero")(user_module.zero_term)
    try:
        config, shapes = DistillConfig(), [torch.Size([4, 8])]
        loss = build_distill_loss(config, shapes, shapes, names=("kd", "kd_test_zero", "kd_user_registry:zero_term"))
        assert set(loss.terms) == {"kd", "kd_test_zero", "kd_user_registry:zero_term"}
        logits = torch.randn(4, 10)
        value = loss(Outputs(logits), Outputs(logits.clone()), torch.zeros(4, dtype=torch.long))
        assert user_module.ZeroTerm.calls == 2 and torch.isfinite(value)
        with pytest.raises(SpaceError, match=r"^distill.losses: unknown loss term 'nope'; fix: use one of: .*hint, kd"):
            build_distill_loss(config, shapes, shapes, names=("nope",))
    finally:
        LOSSES.unregister("kd_test_zero")


# --------------------------------------------------------------------------- wrong names


@pytest.mark.parametrize("section, key, value, path, names", [
    ("compress", "quantize", "int4", "compress.quantize", "dynamic_int8, none, static_int8"),
    ("compress", "quantize", {"choice": ["none", "int4"]}, "compress.quantize.choice[1]", "dynamic_int8, none"),
    ("compress", "prune_criterion", "l3", "compress.prune_criterion", "l1, l2, taylor"),
    ("data", "source", "nope", "data.source", "cifar10, digits, image_folder, mnist, npz"),
    ("students", "resnet", {}, "students.resnet", "cnn, mlp, mobilenet"),
])
def test_wrong_names_are_one_line_errors_listing_the_registered_names(section, key, value, path, names) -> None:
    raw = small_space()
    if section == "students":
        raw["students"] = {key: value}
    else:
        raw.setdefault(section, {})[key] = value
    with pytest.raises(SpaceError) as info:
        parse_space(raw)
    err = info.value
    assert err.path == path and "\n" not in str(err), str(err)
    assert repr(value if isinstance(value, str) else (key if section == "students" else "int4")) in err.problem
    assert names in err.fix, err.fix


def test_wrong_pinned_value_names_the_param() -> None:
    raw = small_space(quantize="none")
    space = parse_space(raw)
    params = {**sample(space), "compress.quantize": "int4"}
    with pytest.raises(SpaceError) as info:
        space.resolve(params)
    assert info.value.path == "params.compress.quantize" and "static_int8" in info.value.fix
