// mtdl_fast._C: the compiled half of the engine. Knows nothing of models or tasks: tensors in,
// tensors out. The affinity and Gram reductions, the task-grouping search, and on the CPU the fused
// K-view augmentation and the per-call parameter program.
#include <torch/extension.h>

#include "affinity.h"
#include "fused_views_cpu.h"
#include "group_search.h"
#include "output_pool.h"
#include "task_params_cpu.h"

namespace {

bool built_with_cuda() {
#ifdef MTDL_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mtdl-fast compiled extension";
  m.def("built_with_cuda", &built_with_cuda, "True when the CUDA sources were compiled in.");
  m.def("affinity_moments", &mtdl::affinity_moments,
        "TAG affinity step folded into running moments: z = 1 - lookahead / base[None, :] (float64, NaN where "
        "invalid) written to z; count (K, K) int64 and moments (4, K, K) float64 [mean, m2, weight, weight_sq] "
        "updated in place where valid (West's weighted update, past weights scaled by decay; Welford without "
        "decay). Returns the number of invalid entries as a 0-dim int64 tensor on the inputs' device.",
        py::arg("base"), py::arg("lookahead"), py::arg("count"), py::arg("moments"), py::arg("decay"), py::arg("z"));
  m.def("gram", &mtdl::gram, "out (K, K) float64 = grads @ grads.T for grads (K, P), accumulated in float64.",
        py::arg("grads"), py::arg("out"));
  m.def("select_groups", &mtdl::select_groups,
        "Exact TAG/HOA task grouping by branch and bound (K <= 20): matrix (K, K) real tensor, budget >= 1, "
        "minimize=False for TAG (affinity, maximise), True for HOA (pairwise losses, minimise). Returns "
        "(value, groups as increasing bitmasks, nodes visited). Releases the GIL while searching.",
        py::arg("matrix"), py::arg("budget"), py::arg("minimize"), py::call_guard<py::gil_scoped_release>());
  m.def("fused_views_abi", &mtdl::fused_views_abi,
        "The fused K-view program ABI: every SPATIAL_*, OP_*, SLOT_* constant (and MAX_OPS, ...) by name.");
  m.def("fused_views_cpu", &mtdl::fused_views_cpu,
        "All K views of x (B, C, H, W) for the program tables (spatial, ops, params) written into out "
        "(K, B, C, H, W): the Triton kernel's program ABI in C++, parallel over (image, row tile). "
        "Releases the GIL.",
        py::arg("x"), py::arg("spatial"), py::arg("ops"), py::arg("params"), py::arg("seed"), py::arg("mean"),
        py::arg("std"), py::arg("normalize"), py::arg("out"), py::call_guard<py::gil_scoped_release>());
  m.def("empty_output", &mtdl::empty_output,
        "An uninitialised contiguous CPU tensor for fused_views_cpu's output: from 1 MiB on (Linux) a mapping "
        "advised onto huge pages and kept for reuse when freed (at most two kept), else at::empty.",
        py::arg("sizes"), py::arg("dtype"));
  m.def("release_cached_outputs", &mtdl::release_cached_outputs,
        "Unmap every freed output mapping kept for reuse; returns their bytes.");
  m.def("cached_output_bytes", &mtdl::cached_output_bytes, "Bytes of freed output mappings kept for reuse.");
  m.def("task_params_abi", &mtdl::task_params_abi,
        "The parameter program ABI: every PARAM_* code, PROGRAM_WIDTH, N_CONSTS and BOX_ATTEMPTS by name.");
  m.def("task_params_cpu", &mtdl::task_params_cpu,
        "The parameter program of K views on B images (kernels/task_params.py ABI) written into values "
        "(K, B, n_values) float64 and table (K, B, N_SLOTS) float32, every element: program (K, L, PROGRAM_WIDTH) "
        "int32, consts (K, L, N_CONSTS) float64, base (K, N_SLOTS) float32, all contiguous CPU tensors; key and "
        "call taken modulo 2^62 and 2^31. Parallel over (view, image). Releases the GIL.",
        py::arg("program"), py::arg("consts"), py::arg("base"), py::arg("values"), py::arg("table"),
        py::arg("height"), py::arg("width"), py::arg("key"), py::arg("call"),
        py::call_guard<py::gil_scoped_release>());
}
