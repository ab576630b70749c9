// mtdl_fast._C: the compiled half of the engine. Knows nothing of models or tasks: tensors in,
// tensors out. Issue #3 adds the affinity reduction and the Gram reduction, #4 the group search.
#include <torch/extension.h>

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
}
