"""Vectorised image ops with torchvision.transforms.v2.functional's names and semantics.

Every numeric parameter is either a number (one value for the batch, exactly torchvision's call)
or a tensor with one value per image, so a batch of B images can be augmented with B different
parameters in one call. Images are (B, C, H, W), C in {1, 3}, uint8 in [0, 255] or float in [0, 1];
uint8 results follow torchvision's truncation (blends) and rounding (warps, filters).
"""
from mtdl_fast.functional.color import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    adjust_sharpness,
    invert,
    posterize,
    rgb_to_grayscale,
    solarize,
)
from mtdl_fast.functional.geometry import affine, horizontal_flip, resized_crop, rotate, vertical_flip
from mtdl_fast.functional.misc import erase, gaussian_blur, gaussian_noise, normalize

__all__ = [
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "adjust_sharpness",
    "affine",
    "erase",
    "gaussian_blur",
    "gaussian_noise",
    "horizontal_flip",
    "invert",
    "normalize",
    "posterize",
    "resized_crop",
    "rgb_to_grayscale",
    "rotate",
    "solarize",
    "vertical_flip",
]
