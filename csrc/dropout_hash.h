// The random bits of the seeded dropout op, shared by its CPU and CUDA kernels (and mirrored by
// reference.seeded_dropout): element i of a call with seed s is kept iff
// dropout_bits(s, i) >= floor(p * 2^32). A counter-based hash, so the mask needs no state, no
// storage and no ordering: any element can be recomputed from (seed, index) alone, which is how
// the backward pass reuses the forward's mask.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DIFFREC_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DIFFREC_HOST_DEVICE inline
#endif

namespace diffrec {

// MurmurHash3's 32-bit finaliser: a bijection with full avalanche.
DIFFREC_HOST_DEVICE uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

DIFFREC_HOST_DEVICE uint32_t dropout_bits(uint64_t seed, uint64_t index) {
  const uint32_t h = fmix32(static_cast<uint32_t>(index) * 0x9e3779b9u + static_cast<uint32_t>(seed));
  return fmix32(h ^ (static_cast<uint32_t>(index >> 32) * 0x85ebca77u) ^ static_cast<uint32_t>(seed >> 32));
}

}  // namespace diffrec
