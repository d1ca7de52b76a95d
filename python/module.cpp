// The extension module diffrec_ext._C: loading it registers the ops; it also tells how it was built.
#include <torch/extension.h>

#include "cpu/seed_scores.h"

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
  m.def(
      "seed_topk_counts",
      [] {
        const auto counts = diffrec::last_seed_topk_counts();
        pybind11::dict out;
        out["users"] = counts.users;
        out["certified"] = counts.certified;
        out["exact_pass"] = counts.exact_pass;
        return out;
      },
      "Users of the last CPU seed_topk call in this process: 'users' (B), 'certified' (answered "
      "by the one pass and its certificate) and 'exact_pass' (scored again by the pass that knows "
      "the final log-sum-exp: the uncertified users, or all of them when lse is given or k > 256). "
      "For benchmarks; concurrent calls overwrite each other's counts.");
}
