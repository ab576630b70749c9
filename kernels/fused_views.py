"""Fused K-view augmentation: one launch reads a batch and writes all K task views.

ABI (the task layer in `mtdl_fast.tasks` fills these tables; this file owns their layout):

* Every view v runs a *program*: one spatial stage ``spatial[v]`` (a ``SPATIAL_*`` code) that decides
  where and how the source image is read, then up to ``MAX_OPS`` pointwise ops ``ops[v, :]`` (``OP_*``
  codes, applied left to right, ``OP_END`` pads), then the optional normalisation and the cast.
* ``params[v, b, :]`` (float32, ``N_SLOTS`` wide) holds image b's parameters for view v at the
  ``SLOT_*`` offsets below. Slots an op does not use are ignored.
* Arithmetic is float32 on images in [0, 1]; uint8 input is scaled by 1/255 at load. The meaning of
  every op is torchvision.transforms.v2.functional on float images (see ../shared/SEMANTICS.md).
"""
from __future__ import annotations

# Spatial stage of a view (at most one per view; it reads the source image).
SPATIAL_NONE = 0      # out pixel (y, x) reads source pixel (y, x)
SPATIAL_WARP = 1      # affine sampling: flips, rotate, affine and resized_crop all fold into it
SPATIAL_BLUR = 2      # gaussian_blur, reflect padding
SPATIAL_SHARPEN = 3   # adjust_sharpness

# Pointwise ops, applied in the order listed in ops[v, :].
OP_END = 0
OP_BRIGHTNESS = 1     # clamp(x * f, 0, 1)
OP_CONTRAST = 2       # blend(x, mean(gray(x)) over the image, f); mean from the pre-pass
OP_SATURATION = 3     # blend(x, gray(x), f); C == 1 unchanged
OP_HUE = 4            # HSV hue shift; C == 1 unchanged
OP_GRAYSCALE = 5      # gray(x) broadcast to all C channels
OP_INVERT = 6         # 1 - x
OP_SOLARIZE = 7       # where(x >= t, 1 - x, x)
OP_POSTERIZE = 8      # floor(x * 2^bits).clamp(0, 2^bits - 1) / 2^bits
OP_NOISE = 9          # x + mean + sigma * randn (Philox keyed by seed, view, image, channel, pixel); clip
OP_ERASE = 10         # pixels in the box [top, top+h) x [left, left+w) set to value

MAX_OPS = 8
MAX_BLUR_KSIZE = 15   # largest odd gaussian kernel size the fused path accepts

# Parameter slots of params[v, b, :].
# Warp: source pixel-index coordinates (pixel centres at integers) of output pixel (x, y):
#   sx = M0 * x + M1 * y + M2 ;  sy = M3 * x + M4 * y + M5
# then clamped to [CLAMP_X0, CLAMP_X1] x [CLAMP_Y0, CLAMP_Y1] (resized_crop's edge replication inside
# the crop box; +-1e30 disables it), then sampled like grid_sample(padding_mode="zeros").
SLOT_M0, SLOT_M1, SLOT_M2, SLOT_M3, SLOT_M4, SLOT_M5 = 0, 1, 2, 3, 4, 5
SLOT_NEAREST = 6      # 1.0: nearest (round half to even, as grid_sample); 0.0: bilinear
SLOT_CLAMP_X0, SLOT_CLAMP_X1, SLOT_CLAMP_Y0, SLOT_CLAMP_Y1 = 7, 8, 9, 10
SLOT_FILL = 11        # fill value, used when SLOT_HAS_FILL is 1.0: out = (img - fill) * mask + fill
SLOT_HAS_FILL = 12    # (nearest: out = fill where mask < 0.5), mask = the warped ones image
# Blur: odd kernel sizes (x is the width) and sigmas; taps exp(-d^2 / (2 sigma^2)), normalised.
SLOT_BLUR_KX, SLOT_BLUR_KY, SLOT_BLUR_SX, SLOT_BLUR_SY = 13, 14, 15, 16
SLOT_SHARPNESS = 17
SLOT_BRIGHTNESS = 18
SLOT_CONTRAST = 19
SLOT_SATURATION = 20
SLOT_HUE = 21
SLOT_SOLARIZE = 22
SLOT_POSTERIZE_BITS = 23
SLOT_NOISE_MEAN, SLOT_NOISE_SIGMA, SLOT_NOISE_CLIP = 24, 25, 26
SLOT_ERASE_TOP, SLOT_ERASE_LEFT, SLOT_ERASE_H, SLOT_ERASE_W, SLOT_ERASE_VALUE = 27, 28, 29, 30, 31
N_SLOTS = 32
