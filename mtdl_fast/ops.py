"""The augmentations a distribution task is built from: one class per op.

Each op knows four things: its parameters' default ranges, how to draw them per image on the
device (`sample`), how to apply them with the plain-PyTorch functional ops (`apply`, the meaning),
and how to write them into the fused kernel's parameter table (`encode`, the fast path). Ops run
on float32 images in [0, 1]; `mtdl_fast.tasks` converts once at the start of a view.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from mtdl_fast.functional import color, geometry, misc
from mtdl_fast.functional._utils import grayscale
from mtdl_fast.kernels import fused_views as K

Range = tuple[float, float]
Params = dict[str, torch.Tensor]


@dataclass
class Draw:
    """Per-image random draws on one device from one generator (no host synchronisation)."""

    n: int
    device: torch.device
    generator: torch.Generator | None

    def uniform(self, low: float, high: float, *shape: int) -> torch.Tensor:
        u = torch.rand((self.n, *shape), generator=self.generator, device=self.device, dtype=torch.float64)
        return low + (high - low) * u

    def integers(self, low: int, high: int) -> torch.Tensor:
        """Uniform integers in [low, high] inclusive, as float64."""
        return torch.floor(self.uniform(low, high + 1)).clamp(max=high)


class Op:
    """Base class: a named augmentation with per-image parameters."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    defaults: ClassVar[dict[str, object]] = {}
    # "flip" and "warp" fold into the kernel's one WARP stage; "filter" is a BLUR/SHARPEN stage;
    # "pointwise" runs after the spatial stage.
    kind: ClassVar[str] = "pointwise"
    opcode: ClassVar[int] = K.OP_END

    def __init__(self, config: dict[str, object]):
        self.config = config

    def range(self, key: str) -> Range:
        value = self.config[key]
        return (float(value), float(value)) if isinstance(value, (int, float)) else (float(value[0]), float(value[1]))

    def sample(self, draw: Draw, height: int, width: int) -> Params:
        return {}

    def apply(self, x: torch.Tensor, p: Params, noise: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, p: Params, table: torch.Tensor, height: int, width: int) -> None:
        """Write this op's parameters into `table` (B, N_SLOTS) of its view."""

    @classmethod
    def validate(cls, config: dict[str, object]) -> None:
        """Raise ValueError for a parameter range this op cannot take."""


def _col(p: torch.Tensor) -> torch.Tensor:
    return p.reshape(-1, 1, 1, 1)


def _check_within(op: str, config: dict[str, object], key: str, low: float, high: float) -> None:
    value = config[key]
    values = [value] if isinstance(value, (int, float)) else list(value)
    if len(values) not in (1, 2) or any(not (low <= float(v) <= high) for v in values):
        raise ValueError(f"{op}: {key} must be a number or a (low, high) range within [{low}, {high}], got {value!r}")


class Identity(Op):
    name = "identity"

    def apply(self, x, p, noise):
        return x


class HorizontalFlip(Op):
    name = "horizontal_flip"
    kind = "flip"

    def apply(self, x, p, noise):
        return geometry.horizontal_flip(x)

    @staticmethod
    def matrix(p: Params, n: int, height: int, width: int) -> torch.Tensor:
        m = torch.tensor([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
        return m.expand(n, 2, 3)


class VerticalFlip(Op):
    name = "vertical_flip"
    kind = "flip"

    def apply(self, x, p, noise):
        return geometry.vertical_flip(x)

    @staticmethod
    def matrix(p: Params, n: int, height: int, width: int) -> torch.Tensor:
        m = torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.0, height - 1.0]], dtype=torch.float64)
        return m.expand(n, 2, 3)


def _centred_to_pixel(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torchvision's centred inverse matrix (B, 2, 3) -> pixel-index coordinates (B, 2, 3)."""
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    m = theta.clone()
    m[:, 0, 2] = theta[:, 0, 2] + cx - theta[:, 0, 0] * cx - theta[:, 0, 1] * cy
    m[:, 1, 2] = theta[:, 1, 2] + cy - theta[:, 1, 0] * cx - theta[:, 1, 1] * cy
    return m


class _Warp(Op):
    kind = "warp"

    def theta(self, p: Params) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, x, p, noise):
        return geometry.warp(x, self.theta(p).to(x.device), "bilinear", self.fill())

    def fill(self) -> float | None:
        value = self.config.get("fill")
        return None if value is None else float(value)

    def matrix(self, p: Params, n: int, height: int, width: int) -> torch.Tensor:
        return _centred_to_pixel(self.theta(p), height, width)


class Rotate(_Warp):
    name = "rotate"
    defaults = {"angle": (-30.0, 30.0), "fill": None}

    def sample(self, draw, height, width):
        return {"angle": draw.uniform(*self.range("angle"))}

    def theta(self, p):
        angle = p["angle"].remainder(360.0)
        zeros = torch.zeros(angle.shape[0], 2, dtype=torch.float64, device=angle.device)
        return geometry.inverse_affine_matrix(-angle, zeros, torch.ones_like(angle), zeros)


class Affine(_Warp):
    name = "affine"
    defaults = {"angle": (-15.0, 15.0), "translate": (0.1, 0.1), "scale": (0.9, 1.1), "shear": (-10.0, 10.0), "fill": None}

    def sample(self, draw, height, width):
        max_dx, max_dy = (float(t) for t in self.config["translate"])
        return {
            "angle": draw.uniform(*self.range("angle")),
            "translate": torch.stack(
                (draw.uniform(-max_dx * width, max_dx * width), draw.uniform(-max_dy * height, max_dy * height)), -1
            ),
            "scale": draw.uniform(*self.range("scale")),
            "shear": torch.stack((draw.uniform(*self.range("shear")), torch.zeros(draw.n, dtype=torch.float64, device=draw.device)), -1),
        }

    def theta(self, p):
        return geometry.inverse_affine_matrix(p["angle"], p["translate"], p["scale"], p["shear"])

    @classmethod
    def validate(cls, config):
        translate = config["translate"]
        if not (isinstance(translate, (tuple, list)) and len(translate) == 2 and all(0 <= float(t) <= 1 for t in translate)):
            raise ValueError(f"affine: translate must be (max_dx, max_dy) fractions in [0, 1], got {translate!r}")
        _check_within("affine", config, "scale", 1e-6, math.inf)


def _sample_boxes(
    draw: Draw, height: int, width: int, scale: Range, ratio: Range, strict: bool, tries: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's RandomResizedCrop / RandomErasing box search, vectorised over images.

    Each image tries `tries` (area, log-aspect) candidates and keeps the first that fits; returns
    (box (n, 4) = top, left, h, w as float64, found (n,) bool).
    """
    area = height * width
    target = area * draw.uniform(scale[0], scale[1], tries)
    aspect = torch.exp(draw.uniform(math.log(ratio[0]), math.log(ratio[1]), tries))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    if strict:  # RandomErasing: the box must be strictly smaller than the image
        ok = (h < height) & (w < width)
    else:  # RandomResizedCrop: 0 < size <= image
        ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    found = ok.any(dim=1)
    first = torch.argmax(ok.to(torch.int8), dim=1, keepdim=True)
    h = h.gather(1, first).squeeze(1)
    w = w.gather(1, first).squeeze(1)
    top = torch.floor(draw.uniform(0.0, 1.0) * (height - h + 1))
    left = torch.floor(draw.uniform(0.0, 1.0) * (width - w + 1))
    return torch.stack((top, left, h, w), dim=-1), found


class ResizedCrop(_Warp):
    name = "resized_crop"
    defaults = {"scale": (0.25, 1.0), "ratio": (3.0 / 4.0, 4.0 / 3.0)}

    def sample(self, draw, height, width):
        ratio = self.range("ratio")
        box, found = _sample_boxes(draw, height, width, self.range("scale"), ratio, strict=False)
        # torchvision's fallback: a centred crop with the aspect ratio clamped into `ratio`
        in_ratio = width / height
        if in_ratio < ratio[0]:
            fw, fh = width, round(width / ratio[0])
        elif in_ratio > ratio[1]:
            fw, fh = round(height * ratio[1]), height
        else:
            fw, fh = width, height
        fallback = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw], dtype=torch.float64, device=draw.device)
        return {"box": torch.where(found[:, None], box, fallback)}

    def apply(self, x, p, noise):
        return geometry._resized_crop(x, p["box"].to(x.device), tuple(x.shape[-2:]), nearest=False)

    def matrix(self, p, n, height, width):
        top, left, h, w = p["box"].unbind(-1)
        sx, sy = w / width, h / height
        m = torch.zeros(n, 2, 3, dtype=torch.float64, device=top.device)
        m[:, 0, 0], m[:, 0, 2] = sx, left + 0.5 * sx - 0.5
        m[:, 1, 1], m[:, 1, 2] = sy, top + 0.5 * sy - 0.5
        return m

    def clamp_box(self, p: Params) -> torch.Tensor:
        top, left, h, w = p["box"].unbind(-1)
        return torch.stack((left, left + w - 1, top, top + h - 1), dim=-1)

    @classmethod
    def validate(cls, config):
        _check_within("resized_crop", config, "scale", 1e-6, 1.0)
        _check_within("resized_crop", config, "ratio", 1e-6, math.inf)


class _Factor(Op):
    """A pointwise op driven by one per-image factor."""

    key: ClassVar[str]
    slot: ClassVar[int]
    bounds: ClassVar[Range] = (0.0, math.inf)
    function: ClassVar[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]

    def sample(self, draw, height, width):
        return {self.key: draw.uniform(*self.range(self.key))}

    def apply(self, x, p, noise):
        return type(self).function(x, _col(p[self.key]).to(x.device))

    def encode(self, p, table, height, width):
        table[:, self.slot] = p[self.key].to(table)

    @classmethod
    def validate(cls, config):
        _check_within(cls.name, config, cls.key, *cls.bounds)


class Brightness(_Factor):
    name, aliases, opcode = "brightness", ("adjust_brightness",), K.OP_BRIGHTNESS
    key, slot, function = "brightness_factor", K.SLOT_BRIGHTNESS, color._brightness
    defaults = {"brightness_factor": (0.6, 1.4)}


class Contrast(_Factor):
    name, aliases, opcode = "contrast", ("adjust_contrast",), K.OP_CONTRAST
    key, slot, function = "contrast_factor", K.SLOT_CONTRAST, color._contrast
    defaults = {"contrast_factor": (0.6, 1.4)}


class Saturation(_Factor):
    name, aliases, opcode = "saturation", ("adjust_saturation",), K.OP_SATURATION
    key, slot, function = "saturation_factor", K.SLOT_SATURATION, color._saturation
    defaults = {"saturation_factor": (0.0, 2.0)}


class Hue(_Factor):
    name, aliases, opcode = "hue", ("adjust_hue",), K.OP_HUE
    key, slot, function = "hue_factor", K.SLOT_HUE, color._hue
    bounds = (-0.5, 0.5)
    defaults = {"hue_factor": (-0.25, 0.25)}


class Solarize(_Factor):
    name, opcode = "solarize", K.OP_SOLARIZE
    key, slot, function = "threshold", K.SLOT_SOLARIZE, color._solarize
    bounds = (0.0, 1.0)
    defaults = {"threshold": (0.3, 0.7)}


class Sharpness(_Factor):
    name, aliases, kind = "sharpness", ("adjust_sharpness",), "filter"
    key, slot, function = "sharpness_factor", K.SLOT_SHARPNESS, color._sharpness
    defaults = {"sharpness_factor": (0.0, 3.0)}


class Posterize(Op):
    name, opcode = "posterize", K.OP_POSTERIZE
    defaults = {"bits": (2, 6)}

    def sample(self, draw, height, width):
        low, high = self.range("bits")
        return {"bits": draw.integers(int(low), int(high))}

    def apply(self, x, p, noise):
        return color._posterize(x, _col(p["bits"]).to(x.device))

    def encode(self, p, table, height, width):
        table[:, K.SLOT_POSTERIZE_BITS] = p["bits"].to(table)

    @classmethod
    def validate(cls, config):
        _check_within("posterize", config, "bits", 0, 8)
        bits = config["bits"]
        if any(int(b) != float(b) for b in ([bits] if isinstance(bits, (int, float)) else bits)):
            raise ValueError(f"posterize: bits must be integers, got {bits!r}")


class Grayscale(Op):
    name, aliases, opcode = "grayscale", ("rgb_to_grayscale",), K.OP_GRAYSCALE

    def apply(self, x, p, noise):
        return grayscale(x).expand_as(x).clone()


class Invert(Op):
    name, opcode = "invert", K.OP_INVERT

    def apply(self, x, p, noise):
        return color._invert(x)


class GaussianBlur(Op):
    name, kind = "gaussian_blur", "filter"
    defaults = {"kernel_size": 5, "sigma": (0.1, 2.0)}

    def sample(self, draw, height, width):
        return {"sigma": draw.uniform(*self.range("sigma"))}

    def apply(self, x, p, noise):
        k = int(self.config["kernel_size"])
        return misc._blur(x, (k, k), p["sigma"].to(x.device)[:, None].expand(-1, 2))

    def encode(self, p, table, height, width):
        k = float(self.config["kernel_size"])
        table[:, K.SLOT_BLUR_KX] = k
        table[:, K.SLOT_BLUR_KY] = k
        table[:, K.SLOT_BLUR_SX] = p["sigma"].to(table)
        table[:, K.SLOT_BLUR_SY] = p["sigma"].to(table)

    @classmethod
    def validate(cls, config):
        k = config["kernel_size"]
        if not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"gaussian_blur: kernel_size must be an odd positive int, got {k!r}")
        _check_within("gaussian_blur", config, "sigma", 1e-6, math.inf)


class GaussianNoise(Op):
    name, opcode = "gaussian_noise", K.OP_NOISE
    defaults = {"mean": 0.0, "sigma": (0.02, 0.1), "clip": True}

    def sample(self, draw, height, width):
        return {"mean": draw.uniform(*self.range("mean")), "sigma": draw.uniform(*self.range("sigma"))}

    def apply(self, x, p, noise):
        return misc._noise(x, _col(p["mean"]).to(x.device), _col(p["sigma"]).to(x.device), bool(self.config["clip"]), noise)

    def encode(self, p, table, height, width):
        table[:, K.SLOT_NOISE_MEAN] = p["mean"].to(table)
        table[:, K.SLOT_NOISE_SIGMA] = p["sigma"].to(table)
        table[:, K.SLOT_NOISE_CLIP] = float(bool(self.config["clip"]))

    @classmethod
    def validate(cls, config):
        _check_within("gaussian_noise", config, "sigma", 0.0, math.inf)
        _check_within("gaussian_noise", config, "mean", -1.0, 1.0)


class Erase(Op):
    name, opcode = "erase", K.OP_ERASE
    defaults = {"scale": (0.02, 0.33), "ratio": (0.3, 3.3), "value": 0.0}

    def sample(self, draw, height, width):
        box, found = _sample_boxes(draw, height, width, self.range("scale"), self.range("ratio"), strict=True)
        return {"box": box * found[:, None]}  # no box fits: erase nothing (torchvision returns the image)

    def apply(self, x, p, noise):
        value = torch.tensor(float(self.config["value"]), device=x.device)
        return misc._erase(x, p["box"].to(x.device), value)

    def encode(self, p, table, height, width):
        table[:, K.SLOT_ERASE_TOP : K.SLOT_ERASE_W + 1] = p["box"].to(table)
        table[:, K.SLOT_ERASE_VALUE] = float(self.config["value"])

    @classmethod
    def validate(cls, config):
        _check_within("erase", config, "scale", 0.0, 1.0)
        _check_within("erase", config, "ratio", 1e-6, math.inf)
        _check_within("erase", config, "value", 0.0, 1.0)


OPS: dict[str, type[Op]] = {}
for _op in (
    Identity, HorizontalFlip, VerticalFlip, Rotate, Affine, ResizedCrop, Brightness, Contrast, Saturation, Hue,
    Grayscale, GaussianBlur, GaussianNoise, Erase, Invert, Solarize, Posterize, Sharpness,
):
    for _name in (_op.name, *_op.aliases):
        OPS[_name] = _op


def make_op(name: str, overrides: dict[str, object]) -> Op:
    """Build op `name` with its default ranges updated by `overrides` (only its own keys)."""
    if name not in OPS:
        raise ValueError(f"unknown task op {name!r}; available: {sorted({o.name for o in OPS.values()})}")
    cls = OPS[name]
    config = dict(cls.defaults)
    config.update({k: v for k, v in overrides.items() if k in cls.defaults})
    cls.validate(config)
    return cls(config)
