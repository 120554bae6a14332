"""Compression really shrinks a student: pruning, int8 quantization, the saved artifact, ONNX.

Pruning here removes channels (not masks), so parameters, MACs and bytes on disk all drop;
int8 artifacts weigh about a quarter of float ones; an artifact reloads with
``weights_only=True`` into a model with the same outputs; and prune + KD fine-tune, run by
the trial engine on digits, keeps accuracy close to the unpruned student's.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kdsearch.spaces import PinnedSuggester, RandomSuggester
from kdsearch.spaces.families import ConvBlock, InvertedResidual, get_family
from kdsearch.trainers.checkpoint import load_student, save_student
from kdsearch.trainers.compress import is_pruned, prune_student, recalibrate_batchnorm
from kdsearch.trainers.quantize import get_quantizer, quant_info, quantizer_names
from kdsearch.trainers.trial import run_trial

SHAPE = (1, 8, 8)  # digits
CLASSES = 10

FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "mlp": ("mlp", {"depth": 3, "width": 128}),
    "cnn_residual": ("cnn", {"stages": 2, "channels": 16, "blocks": 2, "residual": True}),
    "cnn_plain_nobn": ("cnn", {"stages": 2, "channels": 16, "blocks": 2, "residual": False, "batch_norm": False}),
    "mobilenet": ("mobilenet", {"stages": 2, "depth": 2, "expansion": 4, "channels": 16}),
}


def builder(family: str, config: dict[str, Any]) -> Callable[[], nn.Module]:
    fam = get_family(family)
    return lambda: fam.build(fam.config(**config), SHAPE, CLASSES)


def make(name: str, seed: int = 0) -> tuple[nn.Module, Callable[[], nn.Module]]:
    """A student with non-trivial BatchNorm statistics (as after training), in eval mode."""
    build = builder(*FAMILIES[name])
    torch.manual_seed(seed)
    model = build()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, *SHAPE))
    return model.eval(), build


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def macs(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(x)
    return counter.get_total_flops() // 2


def batch(n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def calibration() -> list[torch.Tensor]:
    return [batch(32, seed=100 + i) for i in range(4)]


# --------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("name", list(FAMILIES))
def test_pruning_really_shrinks(name: str, tmp_path: Path) -> None:
    model, _ = make(name)
    x, example = batch(), batch(1)
    before = {"params": params(model), "macs": macs(model, example),
              "bytes": save_student(model, tmp_path / "full.pt", {"family": name})}

    pruned = prune_student(model, 0.5, "l1", example)

    after = {"params": params(pruned), "macs": macs(pruned, example),
             "bytes": save_student(pruned, tmp_path / "pruned.pt", {"family": name})}
    for key in before:
        assert after[key] < 0.7 * before[key], (key, before[key], after[key])
    with torch.no_grad():
        out = pruned(x)
    assert out.shape == (16, CLASSES) and torch.isfinite(out).all()
    assert [m for m in pruned.modules() if isinstance(m, nn.Linear)][-1].out_features == CLASSES
    assert is_pruned(pruned)


def test_residual_blocks_stay_residual_after_pruning() -> None:
    model, _ = make("cnn_residual")
    residual_before = [b.residual for b in model.modules() if isinstance(b, ConvBlock)]
    prune_student(model, 0.5, "l2", batch(1))
    blocks = [b for b in model.modules() if isinstance(b, ConvBlock)]
    assert [b.residual for b in blocks] == residual_before and any(residual_before)
    for b in blocks:
        if b.residual:  # both sides of the add were cut together
            assert b.conv.in_channels == b.conv.out_channels
    with torch.no_grad():
        model(batch())


def test_mobilenet_depthwise_pruned_with_its_expand_conv() -> None:
    model, _ = make("mobilenet")
    hidden_before = [b.block[0].out_channels for b in model.modules() if isinstance(b, InvertedResidual)]
    prune_student(model, 0.5, "l1", batch(1))
    blocks = [b for b in model.modules() if isinstance(b, InvertedResidual)]
    for b, before in zip(blocks, hidden_before):
        expand, depthwise, project = b.block[0], b.block[3], b.block[6]
        hidden = expand.out_channels
        assert hidden == before // 2
        assert depthwise.groups == depthwise.in_channels == depthwise.out_channels == hidden
        assert depthwise.weight.shape[0] == hidden and project.in_channels == hidden
        assert b.block[1].num_features == b.block[4].num_features == hidden
    with torch.no_grad():
        assert model(batch()).shape == (16, CLASSES)


def test_ratio_zero_returns_the_model_unchanged() -> None:
    model, _ = make("cnn_residual")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert prune_student(model, 0.0, "l1", batch(1)) is model
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not is_pruned(model)


@pytest.mark.parametrize("criterion", ["l1", "l2", "taylor"])
def test_criteria_and_mode_preserved(criterion: str) -> None:
    model, _ = make("cnn_residual")
    model.train()
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    tracked = int(bn.num_batches_tracked)
    x, y = batch(32), torch.randint(0, CLASSES, (32,))
    loss_fn = (lambda m: nn.functional.cross_entropy(m(x), y)) if criterion == "taylor" else None
    prune_student(model, 0.5, criterion, batch(1), loss_fn=loss_fn)
    assert model.training  # tracing puts models in eval mode; the mode is given back
    assert int(bn.num_batches_tracked) == tracked  # tracing did not update BatchNorm statistics
    assert all(p.grad is None for p in model.parameters())
    assert params(model) < 0.7 * params(make("cnn_residual")[0])


def test_taylor_needs_a_loss_and_bad_arguments_fail() -> None:
    model, _ = make("mlp")
    with pytest.raises(ValueError, match="loss_fn"):
        prune_student(model, 0.5, "taylor", batch(1))
    with pytest.raises(ValueError, match="criterion"):
        prune_student(model, 0.5, "l3", batch(1))
    with pytest.raises(ValueError, match="ratio"):
        prune_student(model, 1.0, "l1", batch(1))


def test_high_ratio_keeps_one_channel_instead_of_skipping_layers() -> None:
    model, _ = make("cnn_residual")
    half = params(prune_student(make("cnn_residual")[0], 0.5, "l1", batch(1)))
    prune_student(model, 0.95, "l1", batch(1))  # 16 * 0.05 < 1: Torch-Pruning alone would skip
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.out_channels >= 1 for c in convs) and min(c.out_channels for c in convs) == 1
    assert params(model) < half
    with torch.no_grad():
        assert model(batch()).shape == (16, CLASSES)


def test_recalibrate_batchnorm_refreshes_statistics_only() -> None:
    model, _ = make("cnn_residual")
    prune_student(model, 0.5, "l1", batch(1))
    weights = {k: v.clone() for k, v in model.named_parameters()}
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    recalibrate_batchnorm(model, calibration())
    assert not model.training and bn.momentum == 0.1
    assert not torch.equal(bn.running_mean, before) and int(bn.num_batches_tracked) == 4
    assert all(torch.equal(weights[k], v) for k, v in model.named_parameters())


def test_pruned_size_does_not_depend_on_weights() -> None:
    """The driver predicts a trial's footprint by pruning a fresh copy: sizes must match."""
    a = prune_student(make("mobilenet", seed=0)[0], 0.3, "l1", batch(1))
    b = prune_student(make("mobilenet", seed=5)[0], 0.3, "l1", torch.zeros(1, *SHAPE))
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]


# --------------------------------------------------------------------------- quantization


def test_registry_and_none() -> None:
    assert {"none", "dynamic_int8", "static_int8"} <= set(quantizer_names())
    model, _ = make("mlp")
    none = get_quantizer("none")
    assert none.quantize(model, [], batch(1)) is model and none.backend == "none"
    for name in ("dynamic_int8", "static_int8"):
        assert get_quantizer(name).backend in torch.backends.quantized.supported_engines
    with pytest.raises(KeyError, match="unknown quantization"):
        get_quantizer("int4")


def test_static_int8_cnn_weighs_a_quarter(tmp_path: Path) -> None:
    fam = get_family("cnn")
    torch.manual_seed(0)
    model = fam.build(fam.config(stages=3, channels=32, blocks=2, residual=True), SHAPE, CLASSES).eval()
    x = batch(64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantized = get_quantizer("static_int8").quantize(model, calibration(), batch(1))
    assert not [w for w in caught if issubclass(w.category, DeprecationWarning) or "deprecated" in str(w.message)]
    assert not model.training and next(model.parameters()).dtype == torch.float32  # input untouched
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in quantized.modules())
    fp32 = save_student(model, tmp_path / "fp32.pt", {})
    int8 = save_student(quantized, tmp_path / "int8.pt", {})
    assert 0.2 < int8 / fp32 < 0.4, (fp32, int8)
    with torch.no_grad():
        ref, out = model(x), quantized(x)
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
    assert quant_info(quantized).backend == get_quantizer("static_int8").backend


def test_dynamic_int8_mlp_quantizes_linear_weights(tmp_path: Path) -> None:
    fam = get_family("mlp")
    torch.manual_seed(0)
    model = fam.build(fam.config(depth=2, width=256), SHAPE, CLASSES).eval()
    quantized = get_quantizer("dynamic_int8").quantize(model, [], batch(1))
    linears = [m for m in quantized.modules() if type(m).__name__ == "Linear"]
    assert not [m for m in linears if isinstance(m, nn.Linear)]  # every float Linear was replaced
    weights = [m.weight() for m in linears]
    assert len(weights) == 3 and all(w.dtype == torch.qint8 for w in weights)
    fp32 = save_student(model, tmp_path / "fp32.pt", {})
    int8 = save_student(quantized, tmp_path / "int8.pt", {})
    assert 0.2 < int8 / fp32 < 0.4, (fp32, int8)
    with torch.no_grad():
        assert (quantized(batch()) - model(batch())).abs().max() < 0.05


# --------------------------------------------------------------------------- the artifact


@pytest.mark.parametrize("name", list(FAMILIES))
def test_pruned_static_int8_roundtrip_is_exact(name: str, tmp_path: Path) -> None:
    model, build = make(name)
    prune_student(model, 0.5, "l1", batch(1))
    quantized = get_quantizer("static_int8").quantize(model, calibration(), batch(1))
    meta = {"family": FAMILIES[name][0], "config": FAMILIES[name][1], "input_shape": list(SHAPE)}
    path = tmp_path / "student.pt"
    size = save_student(quantized, path, meta)
    assert size == path.stat().st_size

    raw = torch.load(path, weights_only=True)  # the project's rule: no pickled code in artifacts
    assert raw["quantize"] == "static_int8" and raw["structure"] is not None

    loaded, loaded_meta = load_student(path, build)
    assert loaded_meta == meta
    x = batch(32, seed=7)
    with torch.no_grad():
        assert torch.equal(loaded(x), quantized(x))
    # a reloaded student saves to the same artifact
    assert save_student(loaded, tmp_path / "again.pt", meta) == size


@pytest.mark.parametrize("quantize", ["none", "dynamic_int8"])
def test_pruned_roundtrip_other_modes(quantize: str, tmp_path: Path) -> None:
    model, build = make("mobilenet")
    prune_student(model, 0.5, "l2", batch(1))
    saved = get_quantizer(quantize).quantize(model, calibration(), batch(1))
    save_student(saved, tmp_path / "s.pt", {"q": quantize})
    loaded, meta = load_student(tmp_path / "s.pt", build)
    x = batch(32, seed=3)
    with torch.no_grad():
        assert (loaded(x) - saved(x)).abs().max() <= 1e-6
    assert meta == {"q": quantize} and not loaded.training


def test_unpruned_float_artifact_is_state_dict_plus_meta(tmp_path: Path) -> None:
    model, build = make("cnn_residual")
    save_student(model, tmp_path / "s.pt", {"a": 1})
    raw = torch.load(tmp_path / "s.pt", weights_only=True)
    assert raw["structure"] is None and raw["quantize"] == "none"
    assert set(raw["state_dict"]) == set(model.state_dict())
    loaded, _ = load_student(tmp_path / "s.pt", build)
    with torch.no_grad():
        assert torch.equal(loaded(batch()), model(batch()))


def test_artifact_errors(tmp_path: Path) -> None:
    model, build = make("mlp")
    with pytest.raises(ValueError, match="JSON"):
        save_student(model, tmp_path / "s.pt", {"bad": object()})
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a kdsearch"):
        load_student(tmp_path / "other.pt", build)
    prune_student(model, 0.5, "l1", batch(1))
    save_student(model, tmp_path / "p.pt", {})
    with pytest.raises(ValueError, match="lacks"):  # an artifact from another architecture
        load_student(tmp_path / "p.pt", builder("mlp", {"depth": 1, "width": 128}))


# --------------------------------------------------------------------------- ONNX


def _ort(path: Path, x: torch.Tensor) -> np.ndarray:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.numpy()})[0]


def test_onnx_export_of_pruned_float_student(tmp_path: Path) -> None:
    """The exporter of record for float students: torch.export-based (dynamo=True)."""
    model, _ = make("mobilenet")
    prune_student(model, 0.5, "l1", batch(1))
    path = tmp_path / "student.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (batch(1),), str(path), dynamo=True, external_data=False,
                          input_names=["x"], output_names=["logits"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},))
    x = batch(8, seed=11)
    with torch.no_grad():
        assert np.abs(_ort(path, x) - model(x).numpy()).max() < 1e-4


def test_onnx_export_of_static_int8_student_is_qdq(tmp_path: Path) -> None:
    """torch.ao int8 models only export with the legacy TorchScript exporter (dynamo=False),
    as QuantizeLinear/DequantizeLinear ONNX; ONNX Runtime's int8 arithmetic differs from
    fbgemm's by a quantization step or so, not more."""
    onnx = pytest.importorskip("onnx")
    model, _ = make("cnn_plain_nobn")
    prune_student(model, 0.5, "l1", batch(1))
    quantized = get_quantizer("static_int8").quantize(model, calibration(), batch(1))
    path = tmp_path / "int8.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # output_names is required: without it the legacy exporter's dynamic_axes check
        # calls graph.outputs() on the FX GraphModule and fails
        torch.onnx.export(quantized, (batch(1),), str(path), dynamo=False, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    x = batch(8, seed=11)
    with torch.no_grad():
        ref = quantized(x).numpy()
    out = _ort(path, x)
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max() + 1e-3


# --------------------------------------------------------------------------- accuracy after pruning

PRUNED_CNN = {
    "student.family": "cnn", "student.cnn.stages": 2, "student.cnn.channels": 16, "student.cnn.blocks": 2,
    "student.cnn.kernel": 3, "student.cnn.residual": True, "distill.hint_stages": "none",
    "distill.temperature": 4.0, "distill.alpha": 0.7, "train.lr": 0.005, "train.batch_size": 32,
    "train.weight_decay": 1e-4, "compress.prune_ratio": 0.5, "compress.quantize": "none",
}

#: most accuracy (points) that prune 0.5 + 3 KD fine-tune epochs may lose against the distilled student
PRUNE_FINETUNE_MAX_DROP_POINTS = 6.0


def test_prune_and_kd_finetune_keep_digits_accuracy(digits_space, digits_context) -> None:
    """Prune 0.5 + 3 epochs of KD fine-tune loses at most 6 points against the unpruned student.

    The student: digits CNN, 2 stages of 2 residual blocks, 16 channels (15.8k params, 4,962
    after pruning 0.5), distilled 4 epochs, pruned (l1), BatchNorm recalibrated, fine-tuned 3
    epochs. Measured with ``run_trial`` over seeds 0-39 (one thread): the distilled student
    scores 0.980-0.997, the pruned and fine-tuned one 0.947-0.992; the change is -4.46 to
    +0.84 points, mean -1.34, sd 0.90 (one validation sample is 0.28 points of 359; seed 0,
    the one run here: -1.67). The bound, 6 points, is the worst seed with 1.5 points of margin
    (about mean - 5 sd) for other CPUs, thread counts and teachers. The same setup with one
    block per stage (2,034 params after pruning) is not used: it loses 0.6-10 points over 30
    seeds, too spread for a useful bound. About 3-5 s on one thread.
    """
    config = digits_space.sample(PinnedSuggester(PRUNED_CNN, RandomSuggester(0)))
    config["compress.finetune_epochs"] = 3  # fixed here, whatever the built-in space says
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the cores are shared: more threads make this slower, not faster
    try:
        result = run_trial(digits_space, config, context=digits_context, seed=0, epochs=4)
    finally:
        torch.set_num_threads(threads)
    full = digits_space.build_student(digits_space.resolve(config), (1, 8, 8), 10)
    assert result["params"] < 0.4 * params(full)  # it really was pruned
    assert result["epoch"] == 4 + 3
    distilled, final = result["val_acc_distilled"], result["val_acc"]
    assert distilled >= 0.95, distilled  # the distillation itself worked (0.980 or more over 40 seeds)
    drop = 100 * (distilled - final)
    assert drop <= PRUNE_FINETUNE_MAX_DROP_POINTS, (distilled, final)
