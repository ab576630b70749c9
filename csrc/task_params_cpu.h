// The per-call parameter program on the CPU: the ABI of kernels/task_params.py (instruction codes,
// table layout, Philox stream) run by C++ loops. Declarations shared by task_params_cpu.cpp and the
// bindings (module.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>

// X(name, value) for every constant of the ABI; kernels/task_params.py defines the same names with
// the same values (tests/test_task_params_cpu.py holds them equal through task_params_abi()).
#define MTDL_TASK_PARAMS_ABI(X) \
  X(PARAM_NONE, 0)              \
  X(PARAM_HFLIP, 1)             \
  X(PARAM_VFLIP, 2)             \
  X(PARAM_ROTATE, 3)            \
  X(PARAM_AFFINE, 4)            \
  X(PARAM_RESIZED_CROP, 5)      \
  X(PARAM_UNIFORM, 6)           \
  X(PARAM_INTEGER, 7)           \
  X(PARAM_ERASE, 8)             \
  X(PROGRAM_WIDTH, 5)           \
  X(N_CONSTS, 8)                \
  X(BOX_ATTEMPTS, 10)

namespace mtdl {

// Every constant of the ABI by name (PARAM_*, PROGRAM_WIDTH, N_CONSTS, BOX_ATTEMPTS).
std::map<std::string, int64_t> task_params_abi();

// The parameter program of K views on B images, written into values and table.
//   program: (K, L, PROGRAM_WIDTH) int32; consts: (K, L, N_CONSTS) float64; base: (K, N_SLOTS)
//   float32; values: (K, B, n_values) float64; table: (K, B, N_SLOTS) float32. All contiguous CPU
//   tensors; B and n_values are the outputs' sizes. Every element of values and table is written.
//   height, width: the images' H x W, each in [0, 2^31).
//   key, call: the Philox stream, taken modulo 2^62 and 2^31 (floor modulo, as Python's %).
// Codes, offsets and slots are checked before anything runs (c10::ValueError naming the entry), so
// no table content can make it read or write out of bounds. Parallel over (view, image) with
// at::parallel_for; every (view, image) is computed alone, so the result does not depend on the
// thread count. Call it without the GIL: it never touches Python objects.
void task_params_cpu(const at::Tensor& program, const at::Tensor& consts, const at::Tensor& base,
                     const at::Tensor& values, const at::Tensor& table, int64_t height, int64_t width, int64_t key,
                     int64_t call);

}  // namespace mtdl
