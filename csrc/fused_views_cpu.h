// The fused K-view augmentation on the CPU: the program ABI of kernels/fused_views.py (codes and
// slots in fused_views_abi.h) run by C++ loops. Declarations shared by fused_views_cpu.cpp and the
// bindings (module.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace mtdl {

// Every constant of the ABI by name (SPATIAL_*, OP_*, SLOT_*, MAX_OPS, ...).
std::map<std::string, int64_t> fused_views_abi();

// out[v, b] = view v's program (spatial stage, then ops[v, :], then the optional normalisation
// (x - mean[c]) / std[c], then the cast to out's dtype) on image b of x.
//   x: (B, C, H, W) CPU, C in {1, 3}, uint8 (scaled by 1/255) / float16 / bfloat16 / float32, any strides.
//   spatial: (K,) int32; ops: (K, MAX_OPS) int32; params: (K, B, N_SLOTS) float32 contiguous.
//   seed: keys OP_NOISE's Philox4x32-10 stream exactly as the Triton kernel does (0 <= seed < 2^63).
//   mean, std: 3 values each (used when normalize); out: contiguous (K, B, C, H, W) float32 /
//   float16 / bfloat16, fully overwritten.
// Parallel over (image, row tile) with at::parallel_for; deterministic whatever the thread count.
// Call it without the GIL: it never touches Python objects.
void fused_views_cpu(const at::Tensor& x, const at::Tensor& spatial, const at::Tensor& ops, const at::Tensor& params,
                     int64_t seed, const std::vector<double>& mean, const std::vector<double>& std, bool normalize,
                     const at::Tensor& out);

}  // namespace mtdl
