// CPU kernel of seeded_dropout: out = x * keep / (1 - p), keep from a counter-based hash of
// (seed, element index) (csrc/dropout_hash.h). One pass, no mask stored; the backward is the same
// op on the gradient with the same seed. torch's Bernoulli sampler draws each element from a
// stateful generator (about 12 ns per element here); the hash vectorises (about 1 ns).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "../dropout_hash.h"

namespace diffrec {
namespace {

constexpr int64_t kChunk = 4096;  // elements whose keep flags are made before they are applied

// keep[j] = 1 if element first + j is kept. Compiled for AVX-512, AVX2 and the baseline, picked
// at load time: the hash is 32-bit integer arithmetic that the wider units run 8 or 16 at a time.
__attribute__((target_clones("avx512f", "avx2", "default")))
void keep_flags(uint64_t seed, int64_t first, int64_t count, uint32_t threshold, uint8_t* keep) {
  for (int64_t j = 0; j < count; ++j) {
    keep[j] = dropout_bits(seed, static_cast<uint64_t>(first + j)) >= threshold;
  }
}

at::Tensor seeded_dropout_cpu(const at::Tensor& input, double p, int64_t seed) {
  check_seeded_dropout_args(input, p);
  const at::Tensor x = input.contiguous();
  at::Tensor out = empty_output(x.sizes(), x.options());
  const uint32_t threshold = dropout_threshold(p);
  const int64_t total = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "seeded_dropout_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t scale = static_cast<acc_t>(1.0 / (1.0 - p));
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, total, kChunk, [&](int64_t begin, int64_t end) {
      uint8_t keep[kChunk];
      for (int64_t first = begin; first < end; first += kChunk) {
        const int64_t count = std::min(kChunk, end - first);
        keep_flags(static_cast<uint64_t>(seed), first, count, threshold, keep);
        for (int64_t j = 0; j < count; ++j) {
          dst[first + j] = keep[j] ? static_cast<scalar_t>(static_cast<acc_t>(src[first + j]) * scale)
                                   : scalar_t(0);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(diffrec_ext, CPU, m) { m.impl("seeded_dropout", &seeded_dropout_cpu); }

}  // namespace diffrec
