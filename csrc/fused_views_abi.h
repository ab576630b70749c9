// The program ABI of the fused K-view augmentation: the spatial and op codes of a view's program and
// the slots of the (K, B, N_SLOTS) float32 parameter table. kernels/fused_views.py defines the same
// names with the same values for the Triton kernel and documents what each one means;
// tests/test_fused_cpu.py holds the two equal through mtdl_fast._C.fused_views_abi().
#pragma once

// X for the ABI lists (this one and the parameter program's): one (name, value) entry of the map
// `abi` that a binding returns.
#define MTDL_ABI_MAP_ENTRY(name, value) abi[#name] = value;

// X(name, value) for every constant of the ABI. One list, so the C++ constants and the table the
// binding returns cannot drift apart.
#define MTDL_FUSED_VIEWS_ABI(X)                                                                    \
  /* spatial stage of a view (at most one; it reads the source image) */                          \
  X(SPATIAL_NONE, 0)                                                                               \
  X(SPATIAL_WARP, 1)                                                                               \
  X(SPATIAL_BLUR, 2)                                                                               \
  X(SPATIAL_SHARPEN, 3)                                                                            \
  X(N_SPATIAL, 4)                                                                                  \
  /* pointwise ops, applied in the order of ops[v, :]; OP_END pads */                              \
  X(OP_END, 0)                                                                                     \
  X(OP_BRIGHTNESS, 1)                                                                              \
  X(OP_CONTRAST, 2)                                                                                \
  X(OP_SATURATION, 3)                                                                              \
  X(OP_HUE, 4)                                                                                     \
  X(OP_GRAYSCALE, 5)                                                                               \
  X(OP_INVERT, 6)                                                                                  \
  X(OP_SOLARIZE, 7)                                                                                \
  X(OP_POSTERIZE, 8)                                                                               \
  X(OP_NOISE, 9)                                                                                   \
  X(OP_ERASE, 10)                                                                                  \
  X(N_OPS, 11)                                                                                     \
  X(MAX_OPS, 8)                                                                                    \
  X(MAX_BLUR_KSIZE, 15)                                                                            \
  /* parameter slots of params[v, b, :] */                                                         \
  X(SLOT_M0, 0)                                                                                    \
  X(SLOT_M1, 1)                                                                                    \
  X(SLOT_M2, 2)                                                                                    \
  X(SLOT_M3, 3)                                                                                    \
  X(SLOT_M4, 4)                                                                                    \
  X(SLOT_M5, 5)                                                                                    \
  X(SLOT_NEAREST, 6)                                                                               \
  X(SLOT_CLAMP_X0, 7)                                                                              \
  X(SLOT_CLAMP_X1, 8)                                                                              \
  X(SLOT_CLAMP_Y0, 9)                                                                              \
  X(SLOT_CLAMP_Y1, 10)                                                                             \
  X(SLOT_FILL, 11)                                                                                 \
  X(SLOT_HAS_FILL, 12)                                                                             \
  X(SLOT_BLUR_KX, 13)                                                                              \
  X(SLOT_BLUR_KY, 14)                                                                              \
  X(SLOT_BLUR_SX, 15)                                                                              \
  X(SLOT_BLUR_SY, 16)                                                                              \
  X(SLOT_SHARPNESS, 17)                                                                            \
  X(SLOT_BRIGHTNESS, 18)                                                                           \
  X(SLOT_CONTRAST, 19)                                                                             \
  X(SLOT_SATURATION, 20)                                                                           \
  X(SLOT_HUE, 21)                                                                                  \
  X(SLOT_SOLARIZE, 22)                                                                             \
  X(SLOT_POSTERIZE_BITS, 23)                                                                       \
  X(SLOT_NOISE_MEAN, 24)                                                                           \
  X(SLOT_NOISE_SIGMA, 25)                                                                          \
  X(SLOT_NOISE_CLIP, 26)                                                                           \
  X(SLOT_ERASE_TOP, 27)                                                                            \
  X(SLOT_ERASE_LEFT, 28)                                                                           \
  X(SLOT_ERASE_H, 29)                                                                              \
  X(SLOT_ERASE_W, 30)                                                                              \
  X(SLOT_ERASE_VALUE, 31)                                                                          \
  X(N_SLOTS, 32)

namespace mtdl {
namespace fv {

#define MTDL_FUSED_VIEWS_CONSTANT(name, value) constexpr int name = value;
MTDL_FUSED_VIEWS_ABI(MTDL_FUSED_VIEWS_CONSTANT)
#undef MTDL_FUSED_VIEWS_CONSTANT

}  // namespace fv
}  // namespace mtdl
