// CUDA kernel of seeded_dropout (contract in diffrec_ext/reference.py): the same counter-based
// hash as the CPU kernel (csrc/dropout_hash.h), so both backends draw the same mask for a seed.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "device_utils.cuh"
#include "dropout_hash.h"

namespace diffrec::cuda {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    seeded_dropout_kernel(const scalar_t* x, scalar_t* out, int64_t total, uint64_t seed,
                          uint32_t threshold, at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < total; i += stride) {
    const bool keep = dropout_bits(seed, static_cast<uint64_t>(i)) >= threshold;
    out[i] = keep ? static_cast<scalar_t>(static_cast<acc_t>(x[i]) * scale) : scalar_t(0);
  }
}

at::Tensor seeded_dropout_cuda(const at::Tensor& input, double p, int64_t seed) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(input));
  check_seeded_dropout_args(input, p);
  const at::Tensor x = input.contiguous();
  at::Tensor out = empty_output(x.sizes(), x.options());
  const int64_t total = x.numel();
  if (total == 0) return out;
  const uint32_t threshold = dropout_threshold(p);
  const int64_t blocks = std::min<int64_t>(
      (total + kThreads - 1) / kThreads,
      int64_t(8) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "seeded_dropout_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    seeded_dropout_kernel<scalar_t><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), total, static_cast<uint64_t>(seed),
        threshold, static_cast<acc_t>(1.0 / (1.0 - p)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(diffrec_ext, CUDA, m) { m.impl("seeded_dropout", &seeded_dropout_cuda); }

}  // namespace diffrec::cuda
