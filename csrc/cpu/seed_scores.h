// What the last CPU seed_topk call did, for benchmarks (diffrec_ext._C.seed_topk_counts()).
#pragma once

#include <cstdint>

namespace diffrec {

struct SeedTopkCounts {
  int64_t users = 0;       // B of the call
  int64_t certified = 0;   // users answered by the one pass and its certificate
  int64_t exact_pass = 0;  // users scored by the pass that knows the final lse (the second pass)
};

// Counts of the most recent CPU seed_topk call in this process (zeros before the first).
SeedTopkCounts last_seed_topk_counts();

}  // namespace diffrec
