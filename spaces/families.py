"""Student families: :data:`~kdsearch.spaces.registry.FAMILIES` maps a family name to a builder of an ``nn.Module``.

Every model built here is a :class:`StagedNet` (stem -> stages -> head), so feature hints
can read stage outputs and structured pruning can walk the same layout for every family.
A family's knobs are a pydantic model: the space file is validated against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from kdsearch.spaces.registry import FAMILIES


class StagedNet(nn.Module):
    """``stem -> stages -> head``; ``forward_stages`` also returns each stage's output."""

    def __init__(self, stem: nn.Module, stages: list[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x)

    def forward_stages(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return self.head(x), features


class KnobModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


Builder = Callable[[KnobModel, tuple[int, ...], int], nn.Module]


@dataclass(frozen=True)
class Family:
    """A registered student family: its knob schema and its builder."""

    name: str
    config: type[KnobModel]
    build: Builder

    @property
    def description(self) -> str:
        """The builder's docstring's first line, else the knobs (what ``kdsearch list families`` prints)."""
        doc = (self.build.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else f"knobs: {', '.join(self.config.model_fields)}"


def register_family(name: str, config: type[KnobModel]) -> Callable[[Builder], Builder]:
    """Register ``builder(config, input_shape, num_classes) -> nn.Module`` under ``name`` (in :data:`FAMILIES`)."""

    def wrap(builder: Builder) -> Builder:
        FAMILIES.register(name, Family(name, config, builder))
        return builder

    return wrap


def get_family(name: str) -> Family:
    """The family registered as ``name``; an unknown name raises a SpaceError that is also a KeyError."""
    return FAMILIES.get(name, "students")


def family_names() -> list[str]:
    return FAMILIES.names()


def _activation(name: str) -> nn.Module:
    return {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}[name]()


# --------------------------------------------------------------------------- mlp


class MLPConfig(KnobModel):
    depth: int = Field(2, ge=1, le=8, description="hidden layers")
    width: int = Field(128, ge=4, le=8192, description="units in the first hidden layer")
    taper: float = Field(1.0, gt=0.0, le=1.0, description="each hidden layer is this fraction of the last")
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


@register_family("mlp", MLPConfig)
def build_mlp(cfg: MLPConfig, input_shape: tuple[int, ...], num_classes: int) -> StagedNet:
    """Fully connected layers on the flattened input, narrowing by ``taper``."""
    features = math.prod(input_shape)
    stages, width_in = [], features
    for i in range(cfg.depth):
        width = max(4, int(round(cfg.width * cfg.taper**i)))
        layers: list[nn.Module] = [nn.Linear(width_in, width), _activation(cfg.activation)]
        if cfg.dropout > 0:
            layers.append(nn.Dropout(cfg.dropout))
        stages.append(nn.Sequential(*layers))
        width_in = width
    return StagedNet(nn.Flatten(), stages, nn.Linear(width_in, num_classes))


# --------------------------------------------------------------------------- cnn


class CNNConfig(KnobModel):
    stages: int = Field(3, ge=1, le=5)
    channels: int = Field(32, ge=4, le=1024, description="channels of the first stage; doubled each stage")
    width_mult: float = Field(1.0, gt=0.0, le=4.0)
    blocks: int = Field(1, ge=1, le=8, description="conv blocks per stage")
    kernel: Literal[3, 5, 7] = 3
    residual: bool = True
    batch_norm: bool = True
    activation: Literal["relu", "gelu", "silu"] = "relu"


class ConvBlock(nn.Module):
    """conv-bn-act, plus a shortcut when asked and the shapes allow it."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, bn: bool, act: str, residual: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=not bn)
        self.bn = nn.BatchNorm2d(c_out) if bn else nn.Identity()
        self.act = _activation(act)
        self.residual = residual and c_in == c_out and stride == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn(self.conv(x)))
        return x + y if self.residual else y


def _scaled(channels: float) -> int:
    return max(4, int(round(channels / 4)) * 4)


@register_family("cnn", CNNConfig)
def build_cnn(cfg: CNNConfig, input_shape: tuple[int, ...], num_classes: int) -> StagedNet:
    """Conv-BN-act stages, channels doubled and resolution halved each stage, optional shortcuts."""
    c_in, height = input_shape[0], input_shape[-1]
    width = _scaled(cfg.channels * cfg.width_mult)
    stem = nn.Sequential(
        nn.Conv2d(c_in, width, 3, 1, 1, bias=not cfg.batch_norm),
        nn.BatchNorm2d(width) if cfg.batch_norm else nn.Identity(),
        _activation(cfg.activation),
    )
    stages, c = [], width
    for s in range(cfg.stages):
        c_out = _scaled(cfg.channels * cfg.width_mult * 2**s)
        stride = 2 if s > 0 and height > 2 else 1
        height = (height + 1) // stride
        blocks = [ConvBlock(c, c_out, cfg.kernel, stride, cfg.batch_norm, cfg.activation, cfg.residual)]
        blocks += [
            ConvBlock(c_out, c_out, cfg.kernel, 1, cfg.batch_norm, cfg.activation, cfg.residual)
            for _ in range(cfg.blocks - 1)
        ]
        stages.append(nn.Sequential(*blocks))
        c = c_out
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))
    return StagedNet(stem, stages, head)


# --------------------------------------------------------------------------- mobilenet


class MobileNetConfig(KnobModel):
    stages: int = Field(3, ge=1, le=5)
    depth: int = Field(2, ge=1, le=6, description="inverted residual blocks per stage")
    expansion: int = Field(4, ge=1, le=8)
    kernel: Literal[3, 5, 7] = 3
    width_mult: float = Field(1.0, gt=0.0, le=4.0)
    channels: int = Field(16, ge=4, le=512, description="channels of the first stage before width_mult")


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, depthwise kxk, 1x1 project, shortcut when shapes allow."""

    def __init__(self, c_in: int, c_out: int, expansion: int, kernel: int, stride: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


@register_family("mobilenet", MobileNetConfig)
def build_mobilenet(cfg: MobileNetConfig, input_shape: tuple[int, ...], num_classes: int) -> StagedNet:
    """MobileNetV2 inverted residual stages (expand, depthwise, project)."""
    c_in, height = input_shape[0], input_shape[-1]
    c = _scaled(cfg.channels * cfg.width_mult)
    stem = nn.Sequential(nn.Conv2d(c_in, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU6())
    stages = []
    for s in range(cfg.stages):
        c_out = _scaled(cfg.channels * cfg.width_mult * 2**s)
        stride = 2 if s > 0 and height > 2 else 1
        height = (height + 1) // stride
        blocks = [InvertedResidual(c, c_out, cfg.expansion, cfg.kernel, stride)]
        blocks += [InvertedResidual(c_out, c_out, cfg.expansion, cfg.kernel, 1) for _ in range(cfg.depth - 1)]
        stages.append(nn.Sequential(*blocks))
        c = c_out
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))
    return StagedNet(stem, stages, head)
