// Tells the shared argument checks (csrc/checks.h) whether the current CUDA stream is capturing a
// graph: value checks read device memory back to the host, which a capture does not allow, so
// they are skipped during capture.
#include <c10/cuda/CUDAGraphsC10Utils.h>

#include "checks.h"

namespace diffrec::cuda {
namespace {

bool current_stream_is_capturing() {
  // Only called for CUDA tensors, so a CUDA context exists already.
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

// Static initialisation of this translation unit, when the extension loads. The pointer itself is
// constant-initialised (nullptr) in checks.cpp, so the order of the two units does not matter.
const bool capture_hook_installed = [] {
  diffrec::cuda_stream_is_capturing = &current_stream_is_capturing;
  return true;
}();

}  // namespace
}  // namespace diffrec::cuda
