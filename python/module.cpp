// The extension module diffrec_ext._C: loading it registers the ops; it also tells how it was built.
#include <torch/extension.h>

#ifndef DIFFREC_EXT_VERSION
#define DIFFREC_EXT_VERSION "unknown"
#endif
#ifndef DIFFREC_CUDA_ARCHS
#define DIFFREC_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "diffrec_ext compiled ops (registered under torch.ops.diffrec_ext)";
  m.attr("__version__") = DIFFREC_EXT_VERSION;
#ifdef DIFFREC_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("cuda_archs") = DIFFREC_CUDA_ARCHS;
}
