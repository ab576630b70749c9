// Affinity accumulation and the gradient Gram reduction: argument checks, the CPU implementations,
// and the dispatch to the CUDA implementations (affinity_cuda.cu) for CUDA tensors.
#include "affinity.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>

#ifdef MTDL_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace mtdl {
namespace {

bool is_loss_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// "(a, b, ...)": a shape as Python writes it, so these messages read like the Python layer's.
std::string shape_text(at::IntArrayRef shape) {
  std::string text = "(";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + ")";
}

// A buffer the caller allocated and the reductions write in place: shape, dtype, device and layout.
void check_buffer(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape,
                  const at::Device& device) {
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape_text(shape), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == device, name, " must be on ", device, ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// Checks base (K,) and lookahead (K, K); returns K.
int64_t check_losses(const at::Tensor& base, const at::Tensor& lookahead) {
  TORCH_CHECK(base.dim() == 1, "base must be a 1-D tensor of K losses, got shape ", base.sizes());
  const int64_t K = base.size(0);
  TORCH_CHECK(is_loss_dtype(base.scalar_type()), "base must be float32, float64, float16 or bfloat16, got ",
              base.scalar_type());
  TORCH_CHECK(is_loss_dtype(lookahead.scalar_type()),
              "lookahead must be float32, float64, float16 or bfloat16, got ", lookahead.scalar_type());
  TORCH_CHECK(lookahead.dim() == 2 && lookahead.size(0) == K && lookahead.size(1) == K,
              "lookahead must have shape (", K, ", ", K, "), got ", lookahead.sizes());
  TORCH_CHECK(lookahead.device() == base.device(), "lookahead must be on ", base.device(), ", got ",
              lookahead.device());
  return K;
}

// The share of its weight an observation keeps per later observation: the decay, checked to lie in
// (0, 1), or 1 when unset (every weight 1: Welford).
double checked_keep(std::optional<double> decay) {
  if (!decay.has_value()) return 1.0;
  TORCH_CHECK(*decay > 0.0 && *decay < 1.0, "decay must be in (0, 1), got ", *decay);
  return *decay;
}

#ifdef MTDL_WITH_CUDA
int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: TORCH_CHECK(false, "unsupported dtype ", t);
  }
  return -1;
}
#endif

// ---- affinity: CPU --------------------------------------------------------------------------------
//
// No multiply-add is contracted here (the extension is built without -mfma), so every operation
// rounds exactly as the CUDA kernels' explicit _rn intrinsics and the PyTorch twins' separate ops.

// Z = 1 - v / l for base loss l and lookahead loss v; false when the entry is invalid.
inline bool step_z(double l, double v, double& zz) {
  zz = 1.0 - v / l;
  return std::isfinite(l) && l > 0.0 && std::isfinite(v) && std::isfinite(zz);
}

int64_t affinity_moments_cpu(const at::Tensor& base, const at::Tensor& lookahead, const at::Tensor& count,
                             const at::Tensor& moments, double keep, const at::Tensor& z) {
  const int64_t K = base.numel(), KK = K * K;
  // Every supported dtype converts to float64 exactly, so converting first changes nothing.
  const at::Tensor b64 = base.to(at::kDouble).contiguous();
  const at::Tensor la64 = lookahead.to(at::kDouble).contiguous();
  const double* L = b64.const_data_ptr<double>();
  const double* LA = la64.const_data_ptr<double>();
  int64_t* C = count.mutable_data_ptr<int64_t>();
  double* mean = moments.mutable_data_ptr<double>();
  double* m2 = mean + KK;
  double* weight = m2 + KK;
  double* weight_sq = weight + KK;
  double* Z = z.mutable_data_ptr<double>();
  const double keep_sq = keep * keep;
  int64_t skipped = 0;
  for (int64_t e = 0; e < KK; ++e) {
    double zz;
    if (!step_z(L[e % K], LA[e], zz)) {
      Z[e] = std::numeric_limits<double>::quiet_NaN();
      ++skipped;
      continue;
    }
    Z[e] = zz;
    const double w = keep * weight[e] + 1.0;
    weight_sq[e] = keep_sq * weight_sq[e] + 1.0;
    const double delta = zz - mean[e];
    const double m = mean[e] + delta / w;
    m2[e] = keep * m2[e] + delta * (zz - m);
    mean[e] = m;
    weight[e] = w;
    C[e] += 1;
  }
  return skipped;
}

// ---- Gram: CPU ------------------------------------------------------------------------------------
//
// The columns are cut into chunks whose length depends on P only (at most kCpuMaxChunks chunks), so
// the summation order, and hence the result, does not depend on the number of threads. Each chunk is
// walked in tiles of kCpuTile columns, transposed to float64 (tile[p][a]), and every column adds its
// outer product into the chunk's lower triangle acc[a][b], b <= a: the inner loop over b is an axpy,
// which the compiler vectorises without reassociating any sum. The chunk partials are then added in
// chunk order.

constexpr int64_t kCpuMinChunk = 8192;
constexpr int64_t kCpuMaxChunks = 256;
constexpr int64_t kCpuTile = 64;

template <typename scalar_t>
void gram_chunk_cpu(const scalar_t* x, int64_t K, int64_t P, int64_t begin, int64_t end, double* acc,
                    double* tile) {
  std::fill(acc, acc + K * K, 0.0);
  for (int64_t t0 = begin; t0 < end; t0 += kCpuTile) {
    const int64_t n = std::min(kCpuTile, end - t0);
    for (int64_t a = 0; a < K; ++a) {
      const scalar_t* row = x + a * P + t0;
      for (int64_t p = 0; p < n; ++p) tile[p * K + a] = static_cast<double>(row[p]);
    }
    for (int64_t p = 0; p < n; ++p) {
      const double* __restrict__ col = tile + p * K;
      for (int64_t a = 0; a < K; ++a) {
        const double xa = col[a];
        double* __restrict__ out = acc + a * K;
        for (int64_t b = 0; b <= a; ++b) out[b] += xa * col[b];
      }
    }
  }
}

void gram_cpu(const at::Tensor& x, const at::Tensor& out) {
  const int64_t K = x.size(0), P = x.size(1);
  double* G = out.mutable_data_ptr<double>();
  if (K == 0) return;
  if (P == 0) {
    std::fill(G, G + K * K, 0.0);
    return;
  }
  int64_t chunk = std::max(kCpuMinChunk, (P + kCpuMaxChunks - 1) / kCpuMaxChunks);
  chunk = (chunk + kCpuTile - 1) / kCpuTile * kCpuTile;
  const int64_t nchunks = (P + chunk - 1) / chunk;
  std::vector<double> partial(static_cast<size_t>(nchunks * K * K));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mtdl_gram_cpu", [&] {
    const scalar_t* data = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, nchunks, 1, [&](int64_t c_begin, int64_t c_end) {
      std::vector<double> tile(static_cast<size_t>(kCpuTile * K));
      for (int64_t c = c_begin; c < c_end; ++c) {
        gram_chunk_cpu<scalar_t>(data, K, P, c * chunk, std::min(P, (c + 1) * chunk), partial.data() + c * K * K,
                                 tile.data());
      }
    });
  });
  for (int64_t a = 0; a < K; ++a) {
    for (int64_t b = 0; b <= a; ++b) {
      double s = 0.0;
      for (int64_t c = 0; c < nchunks; ++c) s += partial[c * K * K + a * K + b];
      G[a * K + b] = s;
      G[b * K + a] = s;
    }
  }
}

}  // namespace

// ---- entry points -----------------------------------------------------------------------------------

at::Tensor affinity_moments(const at::Tensor& base, const at::Tensor& lookahead, const at::Tensor& count,
                            const at::Tensor& moments, std::optional<double> decay, const at::Tensor& z) {
  const int64_t K = check_losses(base, lookahead);
  const at::Device device = base.device();
  check_buffer(count, "count", at::kLong, {K, K}, device);
  check_buffer(moments, "moments", at::kDouble, {4, K, K}, device);
  check_buffer(z, "z", at::kDouble, {K, K}, device);
  const double keep = checked_keep(decay);
  if (device.is_cuda()) {
#ifdef MTDL_WITH_CUDA
    const c10::cuda::CUDAGuard guard(device);
    const at::Tensor b = base.contiguous(), la = lookahead.contiguous();
    at::Tensor skipped = at::empty({}, base.options().dtype(at::kLong));
    C10_CUDA_CHECK(static_cast<cudaError_t>(affinity_moments_cuda(
        b.const_data_ptr(), dtype_code(b.scalar_type()), la.const_data_ptr(), dtype_code(la.scalar_type()), K,
        count.mutable_data_ptr<int64_t>(), moments.mutable_data_ptr<double>(), keep, z.mutable_data_ptr<double>(),
        skipped.mutable_data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream(device.index()).stream())));
    return skipped;
#else
    TORCH_CHECK(false, "mtdl_fast._C was built without CUDA; got tensors on ", device);
#endif
  }
  TORCH_CHECK(device.is_cpu(), "affinity_moments supports CPU and CUDA tensors, got ", device);
  const int64_t skipped = affinity_moments_cpu(base, lookahead, count, moments, keep, z);
  return at::scalar_tensor(skipped, at::TensorOptions().dtype(at::kLong));
}

void gram(const at::Tensor& grads, const at::Tensor& out) {
  TORCH_CHECK(grads.dim() == 2, "grads must be a 2-D tensor (K, P), got shape ", grads.sizes());
  TORCH_CHECK(is_loss_dtype(grads.scalar_type()), "grads must be float32, float64, float16 or bfloat16, got ",
              grads.scalar_type());
  const int64_t K = grads.size(0);
  check_buffer(out, "out", at::kDouble, {K, K}, grads.device());
  const at::Tensor x = grads.contiguous();
  if (x.is_cuda()) {
#ifdef MTDL_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    const int64_t P = x.size(1);
    if (K == 0) return;
    if (P == 0) {
      out.zero_();
      return;
    }
    int64_t nchunks = 0, chunk_len = 0;
    gram_cuda_plan(P, &nchunks, &chunk_len);
    const at::Tensor partial = at::empty({nchunks, K, K}, x.options().dtype(at::kDouble));
    C10_CUDA_CHECK(static_cast<cudaError_t>(gram_cuda(x.const_data_ptr(), dtype_code(x.scalar_type()), K, P, nchunks,
                                                      chunk_len, partial.mutable_data_ptr<double>(),
                                                      out.mutable_data_ptr<double>(),
                                                      c10::cuda::getCurrentCUDAStream(x.device().index()).stream())));
    return;
#else
    TORCH_CHECK(false, "mtdl_fast._C was built without CUDA; got grads on ", x.device());
#endif
  }
  TORCH_CHECK(x.is_cpu(), "gram supports CPU and CUDA tensors, got ", x.device());
  gram_cpu(x, out);
}

}  // namespace mtdl
