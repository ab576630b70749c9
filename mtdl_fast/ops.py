"""The augmentations a distribution task is built from: one class per op.

Each op knows four things: its parameters' default ranges; its *parameter program*, the
instructions of `mtdl_fast.kernels.task_params` that draw its per-image parameters (`values`
names what they write) and put them into the fused kernel's table (`instructions`, plus the table
slots that are the same for every image, `table_constants`); and how to apply drawn parameters with
the plain-PyTorch functional ops (`apply`, the meaning). Ops run on float32 images in [0, 1];
`mtdl_fast.tasks` converts once at the start of a view.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import torch

from mtdl_fast.functional import color, geometry, misc
from mtdl_fast.functional._utils import grayscale
from mtdl_fast.kernels import fused_views as K
from mtdl_fast.kernels import task_params as P

Range = tuple[float, float]
Params = dict[str, torch.Tensor]


class Instruction(NamedTuple):
    """One instruction of a parameter program: a ``PARAM_*`` code, its constants and the fused-table
    slots it also writes (see kernels/task_params.py)."""

    code: int
    consts: tuple[float, ...] = ()
    slots: tuple[int, ...] = ()


class Op:
    """Base class: a named augmentation with per-image parameters."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    defaults: ClassVar[dict[str, object]] = {}
    # "flip" and "warp" fold into the kernel's one WARP stage; "filter" is a BLUR/SHARPEN stage;
    # "pointwise" runs after the spatial stage.
    kind: ClassVar[str] = "pointwise"
    opcode: ClassVar[int] = K.OP_END
    # The per-image parameters `instructions` write, in order: (name, width); width 1 is a (B,)
    # tensor, wider ones (B, width).
    values: ClassVar[tuple[tuple[str, int], ...]] = ()

    def __init__(self, config: dict[str, object]):
        self.config = config

    def range(self, key: str) -> Range:
        value = self.config[key]
        return (float(value), float(value)) if isinstance(value, (int, float)) else (float(value[0]), float(value[1]))

    def instructions(self) -> list[Instruction]:
        """This op's part of its view's parameter program."""
        return []

    def table_constants(self) -> dict[int, float]:
        """Fused-table slots this op sets to the same value for every image."""
        return {}

    def apply(self, x: torch.Tensor, p: Params, noise: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

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


class _Flip(Op):
    """A flip: no parameters, one instruction of the parameter program, one functional op."""

    kind = "flip"
    param_code: ClassVar[int]
    function: ClassVar[Callable[[torch.Tensor], torch.Tensor]]

    def instructions(self):
        return [Instruction(self.param_code)]

    def apply(self, x, p, noise):
        return type(self).function(x)


class HorizontalFlip(_Flip):
    name, param_code, function = "horizontal_flip", P.PARAM_HFLIP, geometry.horizontal_flip


class VerticalFlip(_Flip):
    name, param_code, function = "vertical_flip", P.PARAM_VFLIP, geometry.vertical_flip


class _Warp(Op):
    kind = "warp"

    def theta(self, p: Params) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, x, p, noise):
        return geometry.warp(x, self.theta(p).to(x.device), "bilinear", self.fill())

    def fill(self) -> float | None:
        value = self.config.get("fill")
        return None if value is None else float(value)

    def table_constants(self):
        fill = self.fill()
        return {} if fill is None else {K.SLOT_FILL: fill, K.SLOT_HAS_FILL: 1.0}


class Rotate(_Warp):
    name = "rotate"
    defaults = {"angle": (-30.0, 30.0), "fill": None}
    values = (("angle", 1),)

    def instructions(self):
        return [Instruction(P.PARAM_ROTATE, self.range("angle"))]

    def theta(self, p):
        angle = p["angle"].remainder(360.0)
        zeros = torch.zeros(angle.shape[0], 2, dtype=torch.float64, device=angle.device)
        return geometry.inverse_affine_matrix(-angle, zeros, torch.ones_like(angle), zeros)


class Affine(_Warp):
    name = "affine"
    defaults = {"angle": (-15.0, 15.0), "translate": (0.1, 0.1), "scale": (0.9, 1.1), "shear": (-10.0, 10.0),
                "fill": None}
    values = (("angle", 1), ("translate", 2), ("scale", 1), ("shear", 2))

    def instructions(self):
        max_dx, max_dy = (float(t) for t in self.config["translate"])
        consts = (*self.range("angle"), max_dx, max_dy, *self.range("scale"), *self.range("shear"))
        return [Instruction(P.PARAM_AFFINE, consts)]

    def theta(self, p):
        return geometry.inverse_affine_matrix(p["angle"], p["translate"], p["scale"], p["shear"])

    @classmethod
    def validate(cls, config):
        translate = config["translate"]
        pair = isinstance(translate, (tuple, list)) and len(translate) == 2
        if not (pair and all(0 <= float(t) <= 1 for t in translate)):
            raise ValueError(f"affine: translate must be (max_dx, max_dy) fractions in [0, 1], got {translate!r}")
        _check_within("affine", config, "scale", 1e-6, math.inf)


def _box_consts(scale: Range, ratio: Range) -> tuple[float, ...]:
    """Constants of a RandomResizedCrop / RandomErasing box search: area fractions, log aspect
    range, aspect range."""
    return (*scale, math.log(ratio[0]), math.log(ratio[1]), *ratio)


class ResizedCrop(_Warp):
    """torchvision's RandomResizedCrop box (10 attempts, then the centre crop), resized back to the
    input size."""

    name = "resized_crop"
    defaults = {"scale": (0.25, 1.0), "ratio": (3.0 / 4.0, 4.0 / 3.0)}
    values = (("box", 4),)

    def instructions(self):
        return [Instruction(P.PARAM_RESIZED_CROP, _box_consts(self.range("scale"), self.range("ratio")))]

    def apply(self, x, p, noise):
        return geometry._resized_crop(x, p["box"].to(x.device), tuple(x.shape[-2:]), nearest=False)

    @classmethod
    def validate(cls, config):
        _check_within("resized_crop", config, "scale", 1e-6, 1.0)
        _check_within("resized_crop", config, "ratio", 1e-6, math.inf)


class _Factor(Op):
    """A pointwise op driven by one per-image factor. The class statement names the factor: its
    parameter ``key``, drawn per image in the ``default`` range, the ``bounds`` a range must lie in
    and the kernel table ``slot`` it is written to; the body names the op and its functional op."""

    key: ClassVar[str]
    slot: ClassVar[int]
    bounds: ClassVar[Range]
    function: ClassVar[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]

    def __init_subclass__(cls, *, key: str, default: Range, slot: int, bounds: Range = (0.0, math.inf), **kwargs):
        super().__init_subclass__(**kwargs)
        cls.key, cls.slot, cls.bounds = key, slot, bounds
        cls.defaults = {key: default}
        cls.values = ((key, 1),)  # every factor op draws its one named factor

    def instructions(self):
        return [Instruction(P.PARAM_UNIFORM, self.range(self.key), (self.slot,))]

    def apply(self, x, p, noise):
        return type(self).function(x, _col(p[self.key]).to(x.device))

    @classmethod
    def validate(cls, config):
        _check_within(cls.name, config, cls.key, *cls.bounds)


class Brightness(_Factor, key="brightness_factor", default=(0.6, 1.4), slot=K.SLOT_BRIGHTNESS):
    name, aliases, opcode, function = "brightness", ("adjust_brightness",), K.OP_BRIGHTNESS, color._brightness


class Contrast(_Factor, key="contrast_factor", default=(0.6, 1.4), slot=K.SLOT_CONTRAST):
    name, aliases, opcode, function = "contrast", ("adjust_contrast",), K.OP_CONTRAST, color._contrast


class Saturation(_Factor, key="saturation_factor", default=(0.0, 2.0), slot=K.SLOT_SATURATION):
    name, aliases, opcode, function = "saturation", ("adjust_saturation",), K.OP_SATURATION, color._saturation


class Hue(_Factor, key="hue_factor", default=(-0.25, 0.25), bounds=(-0.5, 0.5), slot=K.SLOT_HUE):
    name, aliases, opcode, function = "hue", ("adjust_hue",), K.OP_HUE, color._hue


class Solarize(_Factor, key="threshold", default=(0.3, 0.7), bounds=(0.0, 1.0), slot=K.SLOT_SOLARIZE):
    name, opcode, function = "solarize", K.OP_SOLARIZE, color._solarize


class Sharpness(_Factor, key="sharpness_factor", default=(0.0, 3.0), slot=K.SLOT_SHARPNESS):
    name, aliases, kind, function = "sharpness", ("adjust_sharpness",), "filter", color._sharpness


class Posterize(Op):
    name, opcode = "posterize", K.OP_POSTERIZE
    defaults = {"bits": (2, 6)}
    values = (("bits", 1),)

    def instructions(self):
        return [Instruction(P.PARAM_INTEGER, self.range("bits"), (K.SLOT_POSTERIZE_BITS,))]

    def apply(self, x, p, noise):
        return color._posterize(x, _col(p["bits"]).to(x.device))

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
    values = (("sigma", 1),)

    def instructions(self):
        return [Instruction(P.PARAM_UNIFORM, self.range("sigma"), (K.SLOT_BLUR_SX, K.SLOT_BLUR_SY))]

    def table_constants(self):
        k = float(self.config["kernel_size"])
        return {K.SLOT_BLUR_KX: k, K.SLOT_BLUR_KY: k}

    def apply(self, x, p, noise):
        k = int(self.config["kernel_size"])
        return misc._blur(x, (k, k), p["sigma"].to(x.device)[:, None].expand(-1, 2))

    @classmethod
    def validate(cls, config):
        k = config["kernel_size"]
        if not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"gaussian_blur: kernel_size must be an odd positive int, got {k!r}")
        _check_within("gaussian_blur", config, "sigma", 1e-6, math.inf)


class GaussianNoise(Op):
    name, opcode = "gaussian_noise", K.OP_NOISE
    defaults = {"mean": 0.0, "sigma": (0.02, 0.1), "clip": True}
    values = (("mean", 1), ("sigma", 1))

    def instructions(self):
        return [Instruction(P.PARAM_UNIFORM, self.range("mean"), (K.SLOT_NOISE_MEAN,)),
                Instruction(P.PARAM_UNIFORM, self.range("sigma"), (K.SLOT_NOISE_SIGMA,))]

    def table_constants(self):
        return {K.SLOT_NOISE_CLIP: float(bool(self.config["clip"]))}

    def apply(self, x, p, noise):
        mean, sigma = _col(p["mean"]).to(x.device), _col(p["sigma"]).to(x.device)
        return misc._noise(x, mean, sigma, bool(self.config["clip"]), noise)

    @classmethod
    def validate(cls, config):
        _check_within("gaussian_noise", config, "sigma", 0.0, math.inf)
        _check_within("gaussian_noise", config, "mean", -1.0, 1.0)


class Erase(Op):
    """torchvision's RandomErasing box (10 attempts; none fits: the box is all zeros and nothing is
    erased, as torchvision returns the image) filled with `value`."""

    name, opcode = "erase", K.OP_ERASE
    defaults = {"scale": (0.02, 0.33), "ratio": (0.3, 3.3), "value": 0.0}
    values = (("box", 4),)

    def instructions(self):
        return [Instruction(P.PARAM_ERASE, _box_consts(self.range("scale"), self.range("ratio"))[:4])]

    def table_constants(self):
        return {K.SLOT_ERASE_VALUE: float(self.config["value"])}

    def apply(self, x, p, noise):
        value = torch.tensor(float(self.config["value"]), device=x.device)
        return misc._erase(x, p["box"].to(x.device), value)

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
