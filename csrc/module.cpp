// mtdl_fast._C: the compiled half of the engine. Knows nothing of models or tasks: tensors in,
// tensors out. Issue #3 adds the affinity reduction and the Gram reduction, #4 the group search.
#include <torch/extension.h>

#include "affinity.h"
#include "group_search.h"

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
  m.def("affinity_update", &mtdl::affinity_update,
        "TAG affinity step: z = 1 - lookahead / base[None, :] (float64, NaN where invalid) written to z; "
        "the running state (total: sum, or EMA when decay is given; count) updated in place where valid. "
        "Returns the number of invalid entries as a 0-dim int64 tensor on the inputs' device.",
        py::arg("base"), py::arg("lookahead"), py::arg("total"), py::arg("count"), py::arg("decay"), py::arg("z"));
  m.def("gram", &mtdl::gram, "out (K, K) float64 = grads @ grads.T for grads (K, P), accumulated in float64.",
        py::arg("grads"), py::arg("out"));
  m.def("select_groups", &mtdl::select_groups,
        "Exact TAG/HOA task grouping by branch and bound (K <= 20): matrix (K, K) real tensor, budget >= 1, "
        "minimize=False for TAG (affinity, maximise), True for HOA (pairwise losses, minimise). Returns "
        "(value, groups as increasing bitmasks, nodes visited). Releases the GIL while searching.",
        py::arg("matrix"), py::arg("budget"), py::arg("minimize"), py::call_guard<py::gil_scoped_release>());
}
