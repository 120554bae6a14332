"""Batched data augmentation whose every random choice is a stored, per-sample parameter.

Consistent teaching (Beyer et al., CVPR 2022) needs the teacher to see exactly the view the
student sees. Online, both see the same augmented batch. With ``distill.teacher_views: K``
the teacher's outputs on K views of every training sample are computed once per search, so a
view must be reproducible later, in another process, from its parameters alone: here an
augmentation first draws per-sample parameters (crop offsets, flips, mixing partner and
weight, noise seed) for ``n`` samples from a seeded generator, then applies them to a batch.
Stored views keep only those parameters (a few bytes a sample), never the augmented images.
(kornia's and torchvision's transforms draw their randomness inside the call, which is why
these few ops are written here.)

The ops, in order: ``crop`` (pad by ``crop_padding`` pixels, zero fill, crop back at a random
offset), ``flip`` (horizontal), ``mix`` (``mixup_alpha`` / ``cutmix_alpha``: a sample is mixed
with a partner sample, itself cropped and flipped by its own parameters; with both, each sample
picks one at random), ``noise`` (Gaussian, ``noise_std``, on the standardised inputs). Each is
an entry of :data:`kdsearch.spaces.registry.AUGMENTATIONS`; all are off by default.

>>> import torch
>>> from kdsearch.spaces.schema import AugmentConfig
>>> augment = Augment(AugmentConfig(crop_padding=2, flip=True), (1, 8, 8))
>>> params = augment.sample(4, torch.Generator().manual_seed(0))
>>> x = torch.arange(4 * 64, dtype=torch.float32).reshape(4, 1, 8, 8)
>>> a, b = augment.apply(x, params), augment.apply(x, params)   # the same parameters, the same views
>>> bool(torch.equal(a.x, b.x)), tuple(a.x.shape)
(True, (4, 1, 8, 8))
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from kdsearch.spaces.errors import SpaceError
from kdsearch.spaces.registry import AUGMENTATIONS
from kdsearch.spaces.schema import AugmentConfig

#: a mixing partner's index meaning "no partner" (the sample is not mixed)
NO_PARTNER = -1


@dataclass
class ViewParams:
    """Per-sample parameters of one view of ``n`` samples; a field is None when its op is off."""

    offsets: Optional[torch.Tensor] = None   # (n, 2) int: crop's top-left corner in the padded image
    flip: Optional[torch.Tensor] = None      # (n,) bool
    partner: Optional[torch.Tensor] = None   # (n,) int: the sample mixed in (a dataset index), NO_PARTNER if none
    lam: Optional[torch.Tensor] = None       # (n,) float: the own sample's share of the mix
    box: Optional[torch.Tensor] = None       # (n, 4) int: cutmix's pasted box (y0, y1, x0, x1); y0 == y1 for mixup
    noise_seed: Optional[torch.Tensor] = None  # (n,) int64

    def rows(self, index: torch.Tensor) -> "ViewParams":
        """The parameters of the samples at ``index``."""
        return ViewParams(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                             for f in fields(self)})

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "ViewParams":
        return cls(**{k: v for k, v in tensors.items() if k in {f.name for f in fields(cls)}})


@dataclass
class Augmented:
    """An augmented batch: inputs, and for mixed samples the partner's label and the own share."""

    x: torch.Tensor
    partner_labels: Optional[torch.Tensor] = None  # (B,) dataset labels of the partners (own label where unmixed)
    lam: Optional[torch.Tensor] = None             # (B,) own sample's share, 1 where unmixed

    def targets(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Labels as the loss sees them: class indices, or class probabilities where samples were mixed."""
        if self.lam is None or self.partner_labels is None:
            return labels
        own = F.one_hot(labels, num_classes).float()
        other = F.one_hot(self.partner_labels, num_classes).float()
        return self.lam[:, None] * own + (1 - self.lam[:, None]) * other


# --------------------------------------------------------------------------- the ops (registered)


@AUGMENTATIONS.register("crop")
def crop(x: torch.Tensor, offsets: torch.Tensor, padding: int, fill: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Random crop: pad by ``padding`` pixels of ``fill`` (per channel; the standardised value of a raw 0, so
    the border looks like an image's black border, not a bright frame), cut the original size at ``offsets``."""
    n, _, height, width = x.shape
    fill = torch.zeros(()) if fill is None else fill.to(x.device, x.dtype)
    padded = F.pad(x - fill, (padding, padding, padding, padding)) + fill
    rows = offsets[:, 0, None] + torch.arange(height, device=x.device)  # (n, H)
    cols = offsets[:, 1, None] + torch.arange(width, device=x.device)   # (n, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


@AUGMENTATIONS.register("flip")
def flip(x: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of the samples whose flag is set."""
    return torch.where(flags.view(-1, *[1] * (x.ndim - 1)), x.flip(-1), x)


@AUGMENTATIONS.register("mix")
def mix(x: torch.Tensor, other: torch.Tensor, lam: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Mixup (``lam * x + (1 - lam) * other``) where the box is empty, cutmix (``other`` pasted in the box) where not."""
    out = lam.view(-1, *[1] * (x.ndim - 1)) * x + (1 - lam.view(-1, *[1] * (x.ndim - 1))) * other
    if x.ndim == 4 and bool((box[:, 1] > box[:, 0]).any()):
        height, width = x.shape[-2:]
        ys = torch.arange(height, device=x.device)[None, :, None]
        xs = torch.arange(width, device=x.device)[None, None, :]
        inside = ((ys >= box[:, 0, None, None]) & (ys < box[:, 1, None, None]) &
                  (xs >= box[:, 2, None, None]) & (xs < box[:, 3, None, None]))[:, None]  # (n, 1, H, W)
        cut = (box[:, 1] > box[:, 0]).view(-1, 1, 1, 1)
        out = torch.where(cut, torch.where(inside, other, x), out)
    return out


@AUGMENTATIONS.register("noise")
def noise(x: torch.Tensor, seeds: torch.Tensor, std: float) -> torch.Tensor:
    """Gaussian noise of ``std``, drawn per sample from its own seed (so a stored view is replayed exactly)."""
    draws = [torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(int(s))) for s in seeds.tolist()]
    return x + std * torch.stack(draws).to(x.device, x.dtype)


# --------------------------------------------------------------------------- one trial's augmentation


class Augment:
    """The augmentation a trial's ``train.augment`` asks for, on inputs of ``input_shape``."""

    def __init__(self, config: AugmentConfig, input_shape: tuple[int, ...], fill: Optional[torch.Tensor] = None) -> None:
        self.config, self.input_shape, self.fill = config, tuple(input_shape), fill
        image = len(self.input_shape) == 3
        for name in ("crop_padding", "flip", "cutmix_alpha"):
            if getattr(config, name) and not image:
                raise SpaceError(f"train.augment.{name}", f"needs image data, the data's inputs have shape {input_shape}",
                                 f"set train.augment.{name} off for feature vectors")

    @property
    def active(self) -> bool:
        c = self.config
        return bool(c.crop_padding or c.flip or c.mixup_alpha or c.cutmix_alpha or c.noise_std)

    @property
    def mixes(self) -> bool:
        return bool(self.config.mixup_alpha or self.config.cutmix_alpha)

    def sample(self, n: int, generator: torch.Generator, partners: Optional[torch.Tensor] = None) -> ViewParams:
        """Parameters for ``n`` samples. ``partners``: who each sample mixes with (default: a random other sample
        among the ``n``, so online the partner is a batch position and for stored views a dataset index)."""
        c, params = self.config, ViewParams()
        if c.crop_padding:
            params.offsets = torch.randint(0, 2 * c.crop_padding + 1, (n, 2), generator=generator)
        if c.flip:
            params.flip = torch.rand(n, generator=generator) < 0.5
        if self.mixes:
            params.partner = partners if partners is not None else torch.randperm(n, generator=generator)
            use_cutmix = torch.rand(n, generator=generator) < (0.5 if c.mixup_alpha and c.cutmix_alpha else
                                                                1.0 if c.cutmix_alpha else 0.0)
            alpha = torch.where(use_cutmix, torch.tensor(float(c.cutmix_alpha or 1.0)), torch.tensor(float(c.mixup_alpha or 1.0)))
            lam = _beta(alpha, generator)
            mixed = torch.rand(n, generator=generator) < c.mix_prob
            params.box = torch.zeros(n, 4, dtype=torch.long)
            if c.cutmix_alpha:
                height, width = self.input_shape[-2:]
                cut_h = (height * torch.sqrt(1 - lam)).long()
                cut_w = (width * torch.sqrt(1 - lam)).long()
                cy = torch.randint(0, height, (n,), generator=generator)
                cx = torch.randint(0, width, (n,), generator=generator)
                box = torch.stack([(cy - cut_h // 2).clamp(0, height), (cy + cut_h - cut_h // 2).clamp(0, height),
                                   (cx - cut_w // 2).clamp(0, width), (cx + cut_w - cut_w // 2).clamp(0, width)], 1)
                params.box = torch.where((use_cutmix & mixed)[:, None], box, params.box)
                area = (params.box[:, 1] - params.box[:, 0]) * (params.box[:, 3] - params.box[:, 2])
                lam = torch.where(use_cutmix, 1 - area.float() / (height * width), lam)  # the pasted share, as pasted
            params.lam = torch.where(mixed, lam, torch.ones(n))
            params.partner = torch.where(mixed, params.partner, torch.full((n,), NO_PARTNER))
        if c.noise_std:
            params.noise_seed = torch.randint(0, 2**62, (n,), generator=generator, dtype=torch.int64)
        return params

    def geometric(self, x: torch.Tensor, params: ViewParams) -> torch.Tensor:
        if params.offsets is not None:
            x = crop(x, params.offsets.to(x.device), self.config.crop_padding, self.fill)
        if params.flip is not None:
            x = flip(x, params.flip.to(x.device))
        return x

    def apply(self, x: torch.Tensor, params: ViewParams, partner_x: Optional[torch.Tensor] = None,
              partner_params: Optional[ViewParams] = None, partner_labels: Optional[torch.Tensor] = None,
              labels: Optional[torch.Tensor] = None) -> Augmented:
        """The view of batch ``x`` that ``params`` (rows of this batch) describe.

        Mixing needs the partners' inputs and their own parameters: online they are the batch's
        rows at ``params.partner`` (the default); for stored views the caller gathers them from the data.
        """
        out = self.geometric(x, params)
        result = Augmented(out)
        if params.lam is not None and params.partner is not None:
            mixed = params.partner != NO_PARTNER
            if partner_x is None:  # online: partners are positions in this batch
                where = torch.where(mixed, params.partner, torch.arange(len(x)))
                partner_x, partner_params = x[where.to(x.device)], params.rows(where)
                partner_labels = labels[where.to(labels.device)] if labels is not None else None
            other = self.geometric(partner_x, partner_params or params)
            lam = params.lam.to(x.device, x.dtype)
            result = Augmented(mix(out, other, lam, params.box.to(x.device)), partner_labels, lam)
        if params.noise_seed is not None:
            result.x = noise(result.x, params.noise_seed, self.config.noise_std)
        return result


def _beta(alpha: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Beta(alpha, alpha) draws, one per entry, determined by ``generator`` (torch.distributions takes none)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, dtype=torch.int64))
    a = alpha.double().numpy()
    return torch.from_numpy(np.random.default_rng(seed).beta(a, a)).float()


