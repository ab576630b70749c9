"""Vectorised image ops with torchvision.transforms.v2.functional's names and semantics.

Every numeric parameter is either a number (one value for every image, exactly torchvision's call)
or a tensor with one value per image of the flattened leading dims, so a batch of N images can be
augmented with N different parameters in one call. Images are (..., C, H, W) plain tensors,
tv_tensors.Image or tv_tensors.Video (returned as the same type), uint8 in [0, 255] or float in
[0, 1]; the colour ops take C in {1, 3}, the others any C, as torchvision. uint8 results follow
torchvision's truncation (blends) and rounding (warps, filters); invert, solarize and posterize
also take torchvision's other integer dtypes.
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
