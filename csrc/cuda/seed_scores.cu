// CUDA kernels of the seed-averaged scores of Alg. 3: seed_avg_probs, seed_topk, seed_target_rank
// (contracts in diffrec_ext/reference.py; argument checks and their order as in csrc/cpu/).
//
// Design of this first version: cuBLAS GEMM tiles plus fused epilogue kernels. Each catalog tile's
// logits [B*S, tile] come from one cuBLAS GEMM (bf16/fp16 in, fp32 out, fp32 accumulation) into a
// reusable buffer of 32 MiB by default (catalog_tiles.cuh). A CUTLASS GEMM with the epilogue fused
// into its mainloop would save that buffer's write and read, but could not be validated without a
// GPU when this was written, so it is left for a later version.
//   pass 1: GEMM + online log-sum-exp per (user, seed) row (catalog_tiles.cuh), skipped when the
//     caller gives the lse (a catalog sharded across processes);
//   pass 2: GEMM again + the average over seeds of exp(logit - lse), exclusion applied, then
//     seed_avg_probs writes it to its [B, V] output; seed_target_rank counts the items whose
//     score is >= the target's (in the log domain, as the CPU kernel); seed_topk merges the tile
//     into a running sorted top-k per user kept in its output (k <= kMaxBlockK, in shared memory).
// No [B, S, V] tensor, and for top-k and rank no [B, V] tensor, is allocated. The exception is
// k > kMaxBlockK, where the output itself approaches [B, V]: users then go in groups through a
// bounded [group, V] score buffer and a stable sort.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_scan.cuh>

#include <climits>
#include <cmath>
#include <limits>
#include <sstream>
#include <tuple>

#include "checks.h"
#include "catalog_tiles.cuh"
#include "device_checks.cuh"

namespace diffrec::cuda {
namespace {

// ---------------------------------------------------------------- exclusion lists

constexpr int kKeyThreads = 256;

// keys[i] = user(i) * V + ids[i], where user(i) is the CSR row holding entry i. Sorting the keys
// sorts each user's ids in place (a user's segment keeps its offsets).
__global__ void exclusion_keys_kernel(const int64_t* offsets, const int64_t* ids, int64_t users,
                                      int64_t nnz, int64_t num_items, int64_t* keys) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= nnz) return;
  int64_t lo = 0, hi = users;  // offsets[lo] <= i < offsets[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (offsets[mid] <= i) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  keys[i] = lo * num_items + ids[i];
}

struct SortedExclusion {
  at::Tensor offsets;  // [B + 1]; undefined when nothing is excluded
  at::Tensor keys;     // [nnz] sorted user * V + id
  int64_t count() const { return keys.defined() ? keys.numel() : 0; }
};

SortedExclusion sort_exclusion(const c10::optional<at::Tensor>& offsets,
                               const c10::optional<at::Tensor>& ids, int64_t users,
                               int64_t num_items) {
  if (!offsets.has_value() || ids->numel() == 0) return {};
  SortedExclusion exclusion;
  exclusion.offsets = offsets->contiguous();
  const at::Tensor flat_ids = ids->contiguous();
  const int64_t nnz = flat_ids.numel();
  at::Tensor keys = at::empty_like(flat_ids);
  const int64_t blocks = (nnz + kKeyThreads - 1) / kKeyThreads;
  exclusion_keys_kernel<<<blocks, kKeyThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      exclusion.offsets.data_ptr<int64_t>(), flat_ids.data_ptr<int64_t>(), users, nnz, num_items,
      keys.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  exclusion.keys = std::get<0>(at::sort(keys));
  return exclusion;
}

// ---------------------------------------------------------------- pass 2: seed averages

// exp(logit + bias - lse) of one seed: its term of the seed-averaged probability.
template <typename acc_t>
__device__ __forceinline__ acc_t seed_probability(acc_t raw_logit, acc_t bias, acc_t lse) {
  return exp_acc((raw_logit + bias) - lse);
}

// log of the seed-averaged probability of one item whose raw logit for seed s is
// raw_logit[s * stride]: the largest term is factored out, as in the CPU kernel, so scores below
// float range (1e-38) still order instead of tying at zero. The targets' scores and every item's
// go through this one non-inlined function, so an item whose logits equal the target's gets a
// bit-identical value and the >= comparison counts it against the target.
template <typename acc_t>
__device__ __noinline__ acc_t log_seed_score(const acc_t* raw_logit, int64_t stride, acc_t bias,
                                             const acc_t* lse, int64_t seeds) {
  acc_t largest = negative_infinity<acc_t>();
  for (int64_t s = 0; s < seeds; ++s) {
    const acc_t x = (raw_logit[s * stride] + bias) - lse[s];
    largest = x > largest ? x : largest;
  }
  if (largest == negative_infinity<acc_t>()) return largest;
  acc_t total = 0;
  for (int64_t s = 0; s < seeds; ++s) {
    total += exp_acc(((raw_logit[s * stride] + bias) - lse[s]) - largest);
  }
  return largest + log_acc(total / static_cast<acc_t>(seeds));
}

// kRank compares every item with the target's exact score; kRankBracket (a given lse, no pass 1,
// so the exact score is not known before the target's tile) counts the items above a bracket
// around an estimate of it and keeps those inside the bracket for the end.
enum class SeedEpilogue { kScores, kRank, kRankBracket };

template <typename scalar_t, typename acc_t>
struct SeedAverageTile {
  const acc_t* logits;  // [group users * seeds, ld]: this tile's raw GEMM output
  int64_t ld;
  int64_t width;
  int64_t first_item;
  int64_t num_items;
  int64_t user_begin;  // global index of the group's first user
  int64_t seeds;
  acc_t inv_seeds;
  const scalar_t* bias;            // [V] or nullptr
  const acc_t* lse;                // [B * seeds], global rows
  const int64_t* exclude_offsets;  // [B + 1] or nullptr
  const int64_t* exclude_keys;     // sorted user * V + id
  int64_t exclude_count;           // nnz
  acc_t* scores;                   // kScores: [group users, scores_ld], column = item - first_item
  int64_t scores_ld;
  const int64_t* targets;         // kRank: [B]
  const acc_t* target_log_score;  // kRank: [B]
  int64_t* rank;                  // kRank: [B], accumulated over tiles
  const acc_t* bracket;           // kRankBracket: [B, 2], low and high
  acc_t* exact_score;             // kRankBracket: [B], written by the target's tile
  acc_t* pending;                 // kRankBracket: [B, pending_capacity] scores inside the bracket
  int* pending_count;             // kRankBracket: [B], may exceed the capacity (then unused)
  int pending_capacity;
};

constexpr int kAverageThreads = 256;
constexpr int64_t kAverageColumns = kAverageThreads * 4;  // one quad of items per thread
constexpr int kBitmapWords = kAverageColumns / 32;

// Sets bit c of `bitmap` when item (first_key - user * V) + c is excluded for `user`. Each thread
// looks at one slice of the user's sorted keys and scans it only if it overlaps the block's range.
__device__ void mark_excluded(uint32_t* bitmap, const int64_t* offsets, const int64_t* keys,
                              int64_t count, int64_t user, int64_t first_key) {
  for (int w = threadIdx.x; w < kBitmapWords; w += blockDim.x) bitmap[w] = 0;
  __syncthreads();
  int64_t begin = offsets[user], end = offsets[user + 1];
  // Invalid offsets fail the op's device checks; until then they must not lead out of bounds.
  if (begin < 0 || begin > end || end > count) begin = end = 0;
  const int64_t per_thread = (end - begin + blockDim.x - 1) / blockDim.x;
  const int64_t slice_begin = begin + threadIdx.x * per_thread;
  const int64_t slice_end = slice_begin + per_thread < end ? slice_begin + per_thread : end;
  const int64_t end_key = first_key + kAverageColumns;
  if (slice_begin < slice_end && keys[slice_end - 1] >= first_key && keys[slice_begin] < end_key) {
    for (int64_t i = slice_begin; i < slice_end && keys[i] < end_key; ++i) {
      const int64_t column = keys[i] - first_key;
      if (column >= 0) atomicOr(&bitmap[column / 32], 1u << (column % 32));
    }
  }
  __syncthreads();
}

// Block (user, column block). kScores: score[item] = mean_s exp(logit[user, s, item] + bias -
// lse[user, s]), -inf when excluded. kRank: counts the block's items that beat the target.
template <SeedEpilogue kEpilogue, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kAverageThreads)
    seed_average_kernel(SeedAverageTile<scalar_t, acc_t> p) {
  __shared__ uint32_t excluded_bits[kBitmapWords];
  const int64_t local_user = blockIdx.x;
  const int64_t user = p.user_begin + local_user;
  const int64_t block_column = int64_t(blockIdx.y) * kAverageColumns;
  const bool has_exclusion = p.exclude_offsets != nullptr;
  if (has_exclusion) {
    mark_excluded(excluded_bits, p.exclude_offsets, p.exclude_keys, p.exclude_count, user,
                  user * p.num_items + p.first_item + block_column);
  }
  const int local = threadIdx.x * 4;
  const int64_t j = block_column + local;
  bool valid[4], is_excluded[4];
  acc_t bias[4];
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    valid[c] = j + c < p.width;
    is_excluded[c] =
        has_exclusion && ((excluded_bits[(local + c) / 32] >> ((local + c) % 32)) & 1u) != 0;
    bias[c] = valid[c] ? bias_at<acc_t>(p.bias, p.first_item + j + c) : acc_t(0);
  }
  const acc_t* rows = p.logits + local_user * p.seeds * p.ld + j;
  const acc_t* lse = p.lse + user * p.seeds;
  if constexpr (kEpilogue == SeedEpilogue::kScores) {
    if (j >= p.width) return;
    acc_t sum[4] = {0, 0, 0, 0};
#pragma unroll 4
    for (int64_t s = 0; s < p.seeds; ++s) {
      const Quad<acc_t> raw = load_quad(rows + s * p.ld);
      const acc_t lse_s = lse[s];
#pragma unroll
      for (int c = 0; c < 4; ++c) sum[c] += seed_probability(raw.v[c], bias[c], lse_s);
    }
    acc_t* out = p.scores + local_user * p.scores_ld + j;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      if (valid[c]) out[c] = is_excluded[c] ? negative_infinity<acc_t>() : sum[c] * p.inv_seeds;
    }
  } else {
    const int64_t target = p.targets[user];
    unsigned int beats = 0;
    if constexpr (kEpilogue == SeedEpilogue::kRank) {
      const acc_t target_log_score = p.target_log_score[user];
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        if (valid[c] && !is_excluded[c] && p.first_item + j + c != target &&
            log_seed_score(rows + c, p.ld, bias[c], lse, p.seeds) >= target_log_score) {
          ++beats;
        }
      }
    } else {
      const acc_t low = p.bracket[2 * user], high = p.bracket[2 * user + 1];
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        if (!valid[c]) continue;
        if (p.first_item + j + c == target) {  // from this very GEMM, as the items' scores
          p.exact_score[user] = log_seed_score(rows + c, p.ld, bias[c], lse, p.seeds);
          continue;
        }
        if (is_excluded[c]) continue;
        const acc_t score = log_seed_score(rows + c, p.ld, bias[c], lse, p.seeds);
        if (score > high) {
          ++beats;
        } else if (score >= low) {
          const int slot = atomicAdd(p.pending_count + user, 1);
          if (slot < p.pending_capacity) p.pending[user * p.pending_capacity + slot] = score;
        }
      }
    }
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      beats += __shfl_xor_sync(0xffffffffu, beats, offset);
    }
    if (threadIdx.x % kWarpSize == 0 && beats != 0) {
      atomicAdd(reinterpret_cast<unsigned long long*>(p.rank + user),
                static_cast<unsigned long long>(beats));  // integer sums: order-independent
    }
  }
}

template <SeedEpilogue kEpilogue, typename scalar_t, typename acc_t>
void launch_seed_average(const SeedAverageTile<scalar_t, acc_t>& tile, int64_t group_users,
                         cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned int>(group_users),
                  static_cast<unsigned int>((tile.width + kAverageColumns - 1) / kAverageColumns));
  seed_average_kernel<kEpilogue><<<grid, kAverageThreads, 0, stream>>>(tile);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t>
__global__ void target_log_score_kernel(const acc_t* target_logit, const scalar_t* bias,
                                        const int64_t* targets, int64_t num_items,
                                        const acc_t* lse, int64_t users, int64_t seeds,
                                        acc_t* target_log_score) {
  const int64_t user = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (user >= users) return;
  const int64_t target = targets[user];
  // An out-of-range target fails the op's device checks; it must not read past the bias.
  const bool valid = target >= 0 && target < num_items;
  target_log_score[user] = log_seed_score(target_logit + user * seeds, 1,
                                          valid ? bias_at<acc_t>(bias, target) : acc_t(0),
                                          lse + user * seeds, seeds);
}

// kRankBracket, before the sweep. Per user: the target's raw logits by direct dot products (in
// acc_t, another summation order than the GEMM's), the estimate of its log score from them, and
// a bracket [low, high] around it. A GEMM with fp32 accumulation differs from any other order by
// at most ~d * 2^-24 * sum_i |h_i w_i| per logit (TF32: ~2^-10 of it), and the log score moves by
// at most its largest logit's change plus its own rounding; the bracket is a few times that.
// Only speed depends on it: rank_bracket_finish_kernel checks that the exact score fell inside.
template <typename scalar_t, typename acc_t>
__global__ void target_bracket_kernel(const scalar_t* hidden, const scalar_t* weight,
                                      const scalar_t* bias, const int64_t* targets,
                                      const acc_t* lse, int64_t users, int64_t seeds, int64_t dim,
                                      int64_t num_items, acc_t gemm_error, acc_t* raw,
                                      acc_t* bracket) {
  const int64_t user = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (user >= users) return;
  const int64_t target = targets[user];
  if (target < 0 || target >= num_items) {  // fails the op's device checks; stay in bounds
    bracket[2 * user] = bracket[2 * user + 1] = std::numeric_limits<acc_t>::quiet_NaN();
    return;
  }
  const scalar_t* row = weight + target * dim;
  acc_t largest_magnitude = 0;
  for (int64_t s = 0; s < seeds; ++s) {
    const scalar_t* h = hidden + (user * seeds + s) * dim;
    acc_t dot = 0, magnitude = 0;
    for (int64_t i = 0; i < dim; ++i) {
      const acc_t product = static_cast<acc_t>(h[i]) * static_cast<acc_t>(row[i]);
      dot += product;
      magnitude += product < 0 ? -product : product;
    }
    raw[user * seeds + s] = dot;
    largest_magnitude = magnitude > largest_magnitude ? magnitude : largest_magnitude;
  }
  const acc_t estimate = log_seed_score(raw + user * seeds, 1, bias_at<acc_t>(bias, target),
                                        lse + user * seeds, seeds);
  const acc_t own_rounding = acc_t(16) * std::numeric_limits<acc_t>::epsilon() *
                             (acc_t(1) + (estimate < 0 ? -estimate : estimate));
  const acc_t half = acc_t(4) * gemm_error * largest_magnitude + own_rounding;
  bracket[2 * user] = estimate - half;
  bracket[2 * user + 1] = estimate + half;
}

constexpr int kFinishThreads = 128;

// kRankBracket, after the sweep. Block = user: adds the kept scores that are >= the exact one.
// When the kept scores overflowed or the exact score fell outside the bracket, raises *fallback
// instead: the host then ranks the old way (pass 1 captures the targets' logits).
template <typename acc_t>
__global__ void __launch_bounds__(kFinishThreads)
    rank_bracket_finish_kernel(const acc_t* bracket, const acc_t* exact_score, const acc_t* pending,
                               const int* pending_count, int capacity, int64_t* rank,
                               int* fallback) {
  const int64_t user = blockIdx.x;
  const int count = pending_count[user];
  const acc_t exact = exact_score[user];
  if (count > capacity || !(exact >= bracket[2 * user] && exact <= bracket[2 * user + 1])) {
    if (threadIdx.x == 0) atomicOr(fallback, 1);
    return;
  }
  unsigned int beats = 0;
  for (int i = threadIdx.x; i < count; i += kFinishThreads) {
    beats += pending[user * capacity + i] >= exact ? 1 : 0;
  }
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    beats += __shfl_xor_sync(0xffffffffu, beats, offset);
  }
  if (threadIdx.x % kWarpSize == 0 && beats != 0) {
    atomicAdd(reinterpret_cast<unsigned long long*>(rank + user),
              static_cast<unsigned long long>(beats));
  }
}

// ---------------------------------------------------------------- running top-k

constexpr int kTopkThreads = 256;
constexpr int kTopkChunk = kTopkThreads * 4;  // items screened per round, one quad per thread
constexpr int64_t kMaxBlockK = 1024;          // largest k merged in shared memory

// The ranking order: larger value first, then smaller item id.
template <typename acc_t>
__device__ __forceinline__ bool ranks_before(acc_t value, int id, acc_t other_value,
                                             int other_id) {
  return value > other_value || (value == other_value && id < other_id);
}

// Sorts (values, ids)[0, size) best first; size is a power of two. Ends with a barrier.
template <typename acc_t>
__device__ void bitonic_sort_best_first(acc_t* values, int* ids, int size) {
  for (int span = 2; span <= size; span <<= 1) {
    for (int stride = span / 2; stride > 0; stride /= 2) {
      for (int pair = threadIdx.x; pair < size / 2; pair += blockDim.x) {
        const int lo = 2 * pair - (pair & (stride - 1));
        const int hi = lo + stride;
        const bool best_first = (lo & span) == 0;
        if (ranks_before(values[hi], ids[hi], values[lo], ids[lo]) == best_first) {
          const acc_t value = values[lo];
          values[lo] = values[hi];
          values[hi] = value;
          const int id = ids[lo];
          ids[lo] = ids[hi];
          ids[hi] = id;
        }
      }
      __syncthreads();
    }
  }
}

// How many entries of the best-first list values[0, count) come before an item of value `value`
// whose id is larger than all of theirs (kTieWins: they win ties) or smaller (they lose ties).
template <bool kTieWins, typename acc_t>
__device__ __forceinline__ int count_ranked_before(const acc_t* values, int count, acc_t value) {
  int lo = 0, hi = count;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    const bool before = kTieWins ? values[mid] >= value : values[mid] > value;
    if (before) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

template <typename acc_t>
struct RunningTopk {
  const acc_t* scores;  // [users, ld]: this tile's averaged scores, excluded items at -inf
  int64_t ld;
  int64_t width;
  int64_t first_item;
  int k;
  acc_t* values;  // [users, k]: running top-k, best first (the op's outputs)
  int64_t* ids;   // [users, k]
};

inline size_t running_topk_shared_bytes(int64_t k, size_t value_bytes) {
  return static_cast<size_t>(2 * k + kTopkChunk) * (value_bytes + sizeof(int));
}

// One block per user merges a tile into the user's running top-k. The tile is screened a chunk
// at a time against the current k-th value; the few survivors are sorted (bitonic) and merged by
// rank. Items arrive in increasing id order, so a newcomer that ties the k-th value ranks after
// it and is dropped.
template <typename acc_t>
__global__ void __launch_bounds__(kTopkThreads) running_topk_kernel(RunningTopk<acc_t> p) {
  using BlockScan = cub::BlockScan<int, kTopkThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const int k = p.k;
  acc_t* run_values = reinterpret_cast<acc_t*>(shared_bytes);
  acc_t* next_values = run_values + k;
  acc_t* cand_values = next_values + k;
  int* run_ids = reinterpret_cast<int*>(cand_values + kTopkChunk);
  int* next_ids = run_ids + k;
  int* cand_ids = next_ids + k;

  const int64_t user = blockIdx.x;
  acc_t* user_values = p.values + user * k;
  int64_t* user_ids = p.ids + user * k;
  // Every earlier item was offered (excluded ones at -inf), so the list holds min(k, first_item).
  int count = static_cast<int>(p.first_item < k ? p.first_item : k);
  for (int i = threadIdx.x; i < count; i += kTopkThreads) {
    run_values[i] = user_values[i];
    run_ids[i] = static_cast<int>(user_ids[i]);
  }
  __syncthreads();
  const acc_t* line = p.scores + user * p.ld;
  for (int64_t base = 0; base < p.width; base += kTopkChunk) {
    const bool full = count == k;
    const acc_t threshold = full ? run_values[k - 1] : acc_t(0);
    const int64_t j = base + threadIdx.x * 4;
    Quad<acc_t> value{};
    if (j < p.width) value = load_quad(line + j);
    bool keep[4];
    int kept = 0;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      keep[c] = j + c < p.width && (!full || value.v[c] > threshold);
      kept += keep[c] ? 1 : 0;
    }
    int slot = 0, total = 0;
    BlockScan(scan_storage).ExclusiveSum(kept, slot, total);
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      if (keep[c]) {
        cand_values[slot] = value.v[c];
        cand_ids[slot] = static_cast<int>(p.first_item + j + c);
        ++slot;
      }
    }
    __syncthreads();
    if (total == 0) continue;
    int size = 1;
    while (size < total) size *= 2;
    for (int i = total + threadIdx.x; i < size; i += kTopkThreads) {  // padding ranks last
      cand_values[i] = negative_infinity<acc_t>();
      cand_ids[i] = INT_MAX;
    }
    __syncthreads();
    bitonic_sort_best_first(cand_values, cand_ids, size);
    // Each entry's place in the merged list: its index in its own list plus the entries of the
    // other list ranked before it. The places of both lists together are a permutation.
    for (int i = threadIdx.x; i < total; i += kTopkThreads) {
      const int place = i + count_ranked_before<true>(run_values, count, cand_values[i]);
      if (place < k) {
        next_values[place] = cand_values[i];
        next_ids[place] = cand_ids[i];
      }
    }
    for (int i = threadIdx.x; i < count; i += kTopkThreads) {
      const int place = i + count_ranked_before<false>(cand_values, total, run_values[i]);
      if (place < k) {
        next_values[place] = run_values[i];
        next_ids[place] = run_ids[i];
      }
    }
    __syncthreads();
    acc_t* const old_values = run_values;
    run_values = next_values;
    next_values = old_values;
    int* const old_ids = run_ids;
    run_ids = next_ids;
    next_ids = old_ids;
    count = count + total < k ? count + total : k;
  }
  for (int i = threadIdx.x; i < count; i += kTopkThreads) {
    user_values[i] = run_values[i];
    user_ids[i] = run_ids[i];
  }
}

// ---------------------------------------------------------------- host side

template <typename scalar_t>
struct SeedProblem {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* hidden;  // [users, seeds, dim]
  const scalar_t* weight;  // [items, dim]
  const scalar_t* bias;    // [items] or nullptr
  int64_t users, seeds, dim, items;
  at::TensorOptions acc_options;
  cudaStream_t stream;

  int64_t rows() const { return users * seeds; }

  // Pass-2 arguments shared by every tile; the caller fills the epilogue's own fields.
  SeedAverageTile<scalar_t, acc_t> average_tile(const at::Tensor& logits, int64_t tile,
                                                int64_t first_item, const at::Tensor& lse,
                                                const SortedExclusion& exclusion) const {
    SeedAverageTile<scalar_t, acc_t> p{};
    p.logits = logits.data_ptr<acc_t>();
    p.ld = tile;
    p.width = std::min(tile, items - first_item);
    p.first_item = first_item;
    p.num_items = items;
    p.seeds = seeds;
    p.inv_seeds = acc_t(1) / acc_t(seeds);
    p.bias = bias;
    p.lse = lse.data_ptr<acc_t>();
    if (exclusion.offsets.defined()) {
      p.exclude_offsets = exclusion.offsets.data_ptr<int64_t>();
      p.exclude_keys = exclusion.keys.data_ptr<int64_t>();
      p.exclude_count = exclusion.count();
    }
    return p;
  }

  // GEMM of the logits tile for users [user_begin, user_begin + group_users).
  void logits_tile(const at::Tensor& logits, int64_t tile, int64_t user_begin,
                   int64_t group_users, int64_t first_item) const {
    catalog_logits_tile(hidden + user_begin * seeds * dim, group_users * seeds, dim, weight,
                        first_item, std::min(tile, items - first_item), logits.data_ptr<acc_t>(),
                        tile);
  }

  // Pass 1 over every (user, seed) row: lse [B * S]. With targets, also fills target_logit
  // [B * S] with each row's raw target logit, from the same GEMM calls as pass 2.
  at::Tensor logsumexp(at::Tensor& logits, int64_t tile, const int64_t* targets = nullptr,
                       acc_t* target_logit = nullptr) const {
    return catalog_logsumexp(hidden, rows(), dim, weight, bias, items, logits, tile, targets,
                             seeds, target_logit, nullptr);
  }

  // The given lse [B, S] as rows [B * S], or pass 1 when none is given.
  at::Tensor lse_rows(const c10::optional<at::Tensor>& given, at::Tensor& logits,
                      int64_t tile) const {
    return given.has_value() ? given->contiguous().view({-1}) : logsumexp(logits, tile);
  }
};

template <typename scalar_t>
SeedProblem<scalar_t> make_seed_problem(const at::Tensor& hidden, const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& bias) {
  SeedProblem<scalar_t> problem;
  problem.hidden = hidden.data_ptr<scalar_t>();
  problem.weight = weight.data_ptr<scalar_t>();
  problem.bias = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
  problem.users = hidden.size(0);
  problem.seeds = hidden.size(1);
  problem.dim = hidden.size(2);
  problem.items = weight.size(0);
  problem.acc_options = hidden.options().dtype(at::toOpMathType(hidden.scalar_type()));
  problem.stream = at::cuda::getCurrentCUDAStream();
  check_fits_int32(problem.items, "the number of items V");
  check_fits_int32(problem.rows(), "B * S");
  return problem;
}

template <typename scalar_t>
void seed_avg_probs_impl(const SeedProblem<scalar_t>& problem,
                         const c10::optional<at::Tensor>& given_lse, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tile = catalog_tile_width(problem.rows() * int64_t(sizeof(acc_t)), problem.items);
  at::Tensor logits = at::empty({problem.rows(), tile}, problem.acc_options);
  const at::Tensor lse = problem.lse_rows(given_lse, logits, tile);
  for (int64_t first = 0; first < problem.items; first += tile) {
    problem.logits_tile(logits, tile, 0, problem.users, first);
    auto step = problem.average_tile(logits, tile, first, lse, SortedExclusion{});
    step.scores = out.data_ptr<acc_t>() + first;
    step.scores_ld = problem.items;
    launch_seed_average<SeedEpilogue::kScores>(step, problem.users, problem.stream);
  }
}

template <typename scalar_t>
void seed_topk_in_blocks(const SeedProblem<scalar_t>& problem, int64_t k,
                         const SortedExclusion& exclusion,
                         const c10::optional<at::Tensor>& given_lse, at::Tensor& values,
                         at::Tensor& ids) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tile = catalog_tile_width(
      (problem.rows() + problem.users) * int64_t(sizeof(acc_t)), problem.items);
  at::Tensor logits = at::empty({problem.rows(), tile}, problem.acc_options);
  at::Tensor scores = at::empty({problem.users, tile}, problem.acc_options);
  const at::Tensor lse = problem.lse_rows(given_lse, logits, tile);
  const size_t shared_bytes = running_topk_shared_bytes(k, sizeof(acc_t));
  for (int64_t first = 0; first < problem.items; first += tile) {
    problem.logits_tile(logits, tile, 0, problem.users, first);
    auto step = problem.average_tile(logits, tile, first, lse, exclusion);
    step.scores = scores.data_ptr<acc_t>();
    step.scores_ld = tile;
    launch_seed_average<SeedEpilogue::kScores>(step, problem.users, problem.stream);

    RunningTopk<acc_t> merge{};
    merge.scores = scores.data_ptr<acc_t>();
    merge.ld = tile;
    merge.width = step.width;
    merge.first_item = first;
    merge.k = static_cast<int>(k);
    merge.values = values.data_ptr<acc_t>();
    merge.ids = ids.data_ptr<int64_t>();
    running_topk_kernel<acc_t>
        <<<static_cast<unsigned int>(problem.users), kTopkThreads, shared_bytes, problem.stream>>>(
            merge);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// k > kMaxBlockK: the whole score row of a group of users in a bounded buffer, then a stable
// descending sort (equal scores keep ascending ids), as the reference does.
template <typename scalar_t>
void seed_topk_by_sort(const SeedProblem<scalar_t>& problem, int64_t k,
                       const SortedExclusion& exclusion,
                       const c10::optional<at::Tensor>& given_lse, at::Tensor& values,
                       at::Tensor& ids) {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor lse;
  if (given_lse.has_value()) {
    lse = given_lse->contiguous().view({-1});
  } else {  // pass 1's buffer is released before the group buffers are taken
    const int64_t tile =
        catalog_tile_width(problem.rows() * int64_t(sizeof(acc_t)), problem.items);
    at::Tensor logits = at::empty({problem.rows(), tile}, problem.acc_options);
    lse = problem.logsumexp(logits, tile);
  }
  // Per user: the score row, plus the sorted values and int64 ids that at::sort returns.
  const int64_t bytes_per_user = problem.items * int64_t(2 * sizeof(acc_t) + sizeof(int64_t));
  const int64_t group =
      std::clamp<int64_t>(tile_scratch_bytes() / bytes_per_user, 1, problem.users);
  const int64_t tile =
      catalog_tile_width(group * problem.seeds * int64_t(sizeof(acc_t)), problem.items);
  at::Tensor logits = at::empty({group * problem.seeds, tile}, problem.acc_options);
  at::Tensor scores = at::empty({group, problem.items}, problem.acc_options);
  for (int64_t user_begin = 0; user_begin < problem.users; user_begin += group) {
    const int64_t group_users = std::min(group, problem.users - user_begin);
    for (int64_t first = 0; first < problem.items; first += tile) {
      problem.logits_tile(logits, tile, user_begin, group_users, first);
      auto step = problem.average_tile(logits, tile, first, lse, exclusion);
      step.user_begin = user_begin;
      step.scores = scores.data_ptr<acc_t>() + first;
      step.scores_ld = problem.items;
      launch_seed_average<SeedEpilogue::kScores>(step, group_users, problem.stream);
    }
    const auto sorted = at::sort(scores.narrow(0, 0, group_users), /*stable=*/true, /*dim=*/1,
                                 /*descending=*/true);
    values.narrow(0, user_begin, group_users).copy_(std::get<0>(sorted).narrow(1, 0, k));
    ids.narrow(0, user_begin, group_users).copy_(std::get<1>(sorted).narrow(1, 0, k));
  }
}

// Items kept per user inside the bracket of kRankBracket: a few hundred at V = 1M, bf16.
constexpr int kPendingCapacity = 4096;

// With a given lse: one sweep, the target's exact score taken from its own tile as it passes (see
// kRankBracket). Returns false, with rank partly counted, when a user needs the old way; that is
// known only on the device, so this reads one flag back.
template <typename scalar_t>
bool seed_target_rank_one_sweep(const SeedProblem<scalar_t>& problem, const int64_t* target_ids,
                                const SortedExclusion& exclusion, const at::Tensor& lse,
                                at::Tensor& rank) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tile = catalog_tile_width(problem.rows() * int64_t(sizeof(acc_t)), problem.items);
  at::Tensor logits = at::empty({problem.rows(), tile}, problem.acc_options);
  at::Tensor raw = at::empty({problem.rows()}, problem.acc_options);
  at::Tensor bracket = at::empty({problem.users, 2}, problem.acc_options);
  // NaN until the target's tile writes it: a target never seen fails the bracket test.
  at::Tensor exact = at::full({problem.users}, std::numeric_limits<double>::quiet_NaN(),
                              problem.acc_options);
  at::Tensor pending = at::empty({problem.users, kPendingCapacity}, problem.acc_options);
  at::Tensor pending_count = at::zeros({problem.users}, problem.acc_options.dtype(at::kInt));
  at::Tensor fallback = at::zeros({1}, problem.acc_options.dtype(at::kInt));
  // Relative to sum_i |h_i w_i|: the accumulation's rounding, plus TF32's rounding of the fp32
  // inputs when PyTorch allows it for the GEMMs (the handle follows that setting).
  double gemm_error = problem.dim * std::ldexp(1.0, std::is_same_v<scalar_t, double> ? -53 : -24);
  if (std::is_same_v<scalar_t, float> && at::globalContext().allowTF32CuBLAS()) {
    gemm_error += std::ldexp(1.0, -10);
  }
  constexpr int kThreads = 128;
  target_bracket_kernel<scalar_t, acc_t>
      <<<(problem.users + kThreads - 1) / kThreads, kThreads, 0, problem.stream>>>(
          problem.hidden, problem.weight, problem.bias, target_ids, lse.data_ptr<acc_t>(),
          problem.users, problem.seeds, problem.dim, problem.items, static_cast<acc_t>(gemm_error),
          raw.data_ptr<acc_t>(), bracket.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  for (int64_t first = 0; first < problem.items; first += tile) {
    problem.logits_tile(logits, tile, 0, problem.users, first);
    auto step = problem.average_tile(logits, tile, first, lse, exclusion);
    step.targets = target_ids;
    step.rank = rank.data_ptr<int64_t>();
    step.bracket = bracket.data_ptr<acc_t>();
    step.exact_score = exact.data_ptr<acc_t>();
    step.pending = pending.data_ptr<acc_t>();
    step.pending_count = pending_count.data_ptr<int>();
    step.pending_capacity = kPendingCapacity;
    launch_seed_average<SeedEpilogue::kRankBracket>(step, problem.users, problem.stream);
  }
  rank_bracket_finish_kernel<acc_t><<<problem.users, kFinishThreads, 0, problem.stream>>>(
      bracket.data_ptr<acc_t>(), exact.data_ptr<acc_t>(), pending.data_ptr<acc_t>(),
      pending_count.data_ptr<int>(), kPendingCapacity, rank.data_ptr<int64_t>(),
      fallback.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return fallback.item<int>() == 0;
}

template <typename scalar_t>
void seed_target_rank_impl(const SeedProblem<scalar_t>& problem, const at::Tensor& targets,
                           const SortedExclusion& exclusion,
                           const c10::optional<at::Tensor>& given_lse, at::Tensor& rank) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t* target_ids = targets.data_ptr<int64_t>();
  // A given lse skips pass 1, unless a graph is captured (the one-sweep way may need the old one,
  // which only the device knows).
  if (given_lse.has_value() && !stream_is_capturing()) {
    const at::Tensor lse = given_lse->contiguous().view({-1});
    if (seed_target_rank_one_sweep(problem, target_ids, exclusion, lse, rank)) return;
    rank.zero_();
  }
  const int64_t tile = catalog_tile_width(problem.rows() * int64_t(sizeof(acc_t)), problem.items);
  at::Tensor logits = at::empty({problem.rows(), tile}, problem.acc_options);
  at::Tensor target_logit = at::empty({problem.rows()}, problem.acc_options);
  // Pass 1 captures the targets' logits from the very GEMM calls of pass 2, so a target and an
  // item of equal logits compare exactly; its lse is replaced by a given one.
  at::Tensor lse = problem.logsumexp(logits, tile, target_ids, target_logit.data_ptr<acc_t>());
  if (given_lse.has_value()) lse = given_lse->contiguous().view({-1});
  at::Tensor target_log_score = at::empty({problem.users}, problem.acc_options);
  constexpr int kThreads = 128;
  target_log_score_kernel<<<(problem.users + kThreads - 1) / kThreads, kThreads, 0,
                            problem.stream>>>(target_logit.data_ptr<acc_t>(), problem.bias,
                                              target_ids, problem.items, lse.data_ptr<acc_t>(),
                                              problem.users, problem.seeds,
                                              target_log_score.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  for (int64_t first = 0; first < problem.items; first += tile) {
    problem.logits_tile(logits, tile, 0, problem.users, first);
    auto step = problem.average_tile(logits, tile, first, lse, exclusion);
    step.targets = target_ids;
    step.target_log_score = target_log_score.data_ptr<acc_t>();
    step.rank = rank.data_ptr<int64_t>();
    launch_seed_average<SeedEpilogue::kRank>(step, problem.users, problem.stream);
  }
}

// Per user: the distinct ids among its sorted keys (duplicates count once, as on the CPU); a user
// left with fewer than k items fails the check at its own position.
__global__ void items_left_kernel(const int64_t* offsets, const int64_t* keys, int64_t count,
                                  int64_t users, int64_t num_items, int64_t k, uint64_t key,
                                  unsigned long long* word) {
  const int64_t user = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (user >= users) return;
  const int64_t begin = offsets[user], end = offsets[user + 1];
  if (begin < 0 || begin > end || end > count) return;  // fails the offsets checks instead
  int64_t excluded = 0;
  for (int64_t i = begin; i < end; ++i) excluded += (i == begin || keys[i] != keys[i - 1]) ? 1 : 0;
  if (num_items - excluded < k) record_failure(word, key + uint64_t(user));
}

// No user can lose more than nnz items to exclusion, so k <= V - nnz (the usual case) needs no
// check of the items left. Above that the check needs the device's answer, which a graph capture
// cannot wait for, and without it the op would return excluded ids: the capture is refused
// before anything is captured.
bool k_may_exceed_items_left(int64_t k, int64_t num_items,
                             const c10::optional<at::Tensor>& exclude_ids) {
  const int64_t nnz = exclude_ids.has_value() ? exclude_ids->numel() : 0;
  if (k <= num_items - nnz) return false;
  TORCH_CHECK(!stream_is_capturing(), "seed_topk: k = ", k,
              " may exceed the items left after exclusion (V - len(exclude_ids) = ",
              num_items - nnz,
              "), which cannot be checked during CUDA graph capture; capture with k <= ",
              num_items - nnz, " or call seed_topk outside the capture");
  return true;
}

// As the CPU kernel: k may not exceed the items a user has left after exclusion.
void check_k_within_items_left(DeviceChecks& checks, const SortedExclusion& exclusion, int64_t k,
                               int64_t users, int64_t num_items) {
  const at::Tensor offsets = exclusion.offsets, keys = exclusion.keys;
  const uint64_t key = checks.add([offsets, keys, k, num_items](int64_t user) {
    const int64_t begin = offsets[user].item<int64_t>(), end = offsets[user + 1].item<int64_t>();
    const int64_t excluded = std::get<0>(at::unique_consecutive(keys.slice(0, begin, end))).numel();
    std::ostringstream out;
    out << "k = " << k << " exceeds the " << num_items - excluded << " items left for user "
        << user << " after excluding " << excluded << " of V = " << num_items;
    return out.str();
  });
  constexpr int kThreads = 128;
  items_left_kernel<<<(users + kThreads - 1) / kThreads, kThreads, 0,
                      at::cuda::getCurrentCUDAStream()>>>(
      offsets.data_ptr<int64_t>(), keys.data_ptr<int64_t>(), exclusion.count(), users, num_items,
      k, key, checks.word());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

c10::optional<at::Tensor> contiguous_or_none(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? c10::optional<at::Tensor>(t->contiguous()) : c10::nullopt;
}

// The non-finite checks of the seed ops, after their argument checks (as on the CPU).
void check_seed_inputs_finite(DeviceChecks& checks, const at::Tensor& hidden,
                              const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              const c10::optional<at::Tensor>& lse) {
  checks.finite(hidden, "hidden");
  checks.finite(weight, "weight");
  if (bias.has_value()) checks.finite(*bias, "bias");
  if (lse.has_value()) checks.finite(*lse, "lse");
}

void check_exclusion_values(DeviceChecks& checks, const c10::optional<at::Tensor>& exclude_offsets,
                            const c10::optional<at::Tensor>& exclude_ids, int64_t num_items) {
  if (exclude_offsets.has_value()) checks.exclusion(*exclude_offsets, *exclude_ids, num_items);
}

at::Tensor seed_avg_probs_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias,
                               const c10::optional<at::Tensor>& lse) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(hidden));
  check_catalog_args(hidden, weight, bias, /*seeded=*/true);
  check_seed_lse(lse, hidden);
  DeviceChecks checks(hidden, "seed_avg_probs");
  check_seed_inputs_finite(checks, hidden, weight, bias, lse);
  const at::Tensor hidden_c = hidden.contiguous(), weight_c = weight.contiguous();
  const c10::optional<at::Tensor> bias_c = contiguous_or_none(bias);
  at::Tensor out = at::empty({hidden.size(0), weight.size(0)},
                             hidden.options().dtype(at::toOpMathType(hidden.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(),
                                  "seed_avg_probs_cuda", [&] {
                                    seed_avg_probs_impl(
                                        make_seed_problem<scalar_t>(hidden_c, weight_c, bias_c),
                                        lse, out);
                                  });
  checks.raise_if_failed();
  return out;
}

std::tuple<at::Tensor, at::Tensor> seed_topk_cuda(const at::Tensor& hidden,
                                                  const at::Tensor& weight,
                                                  const c10::optional<at::Tensor>& bias, int64_t k,
                                                  const c10::optional<at::Tensor>& exclude_offsets,
                                                  const c10::optional<at::Tensor>& exclude_ids,
                                                  const c10::optional<at::Tensor>& lse) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(hidden));
  const int64_t num_items = check_catalog_args(hidden, weight, bias, /*seeded=*/true);
  check_seed_lse(lse, hidden);
  const int64_t users = hidden.size(0);
  TORCH_CHECK(k >= 1 && k <= num_items, "k = ", k, " must be in [1, V = ", num_items, "]");
  check_exclusion_args(exclude_offsets, exclude_ids, users, num_items, hidden);
  const bool check_items_left = k_may_exceed_items_left(k, num_items, exclude_ids);
  DeviceChecks checks(hidden, "seed_topk");
  check_exclusion_values(checks, exclude_offsets, exclude_ids, num_items);
  const SortedExclusion exclusion = sort_exclusion(exclude_offsets, exclude_ids, users, num_items);
  if (check_items_left) check_k_within_items_left(checks, exclusion, k, users, num_items);
  check_seed_inputs_finite(checks, hidden, weight, bias, lse);
  const at::Tensor hidden_c = hidden.contiguous(), weight_c = weight.contiguous();
  const c10::optional<at::Tensor> bias_c = contiguous_or_none(bias);
  at::Tensor values =
      at::empty({users, k}, hidden.options().dtype(at::toOpMathType(hidden.scalar_type())));
  at::Tensor ids = at::empty({users, k}, hidden.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, hidden.scalar_type(), "seed_topk_cuda", [&] {
        const auto problem = make_seed_problem<scalar_t>(hidden_c, weight_c, bias_c);
        if (k <= kMaxBlockK) {
          seed_topk_in_blocks(problem, k, exclusion, lse, values, ids);
        } else {
          seed_topk_by_sort(problem, k, exclusion, lse, values, ids);
        }
      });
  checks.raise_if_failed();
  return {values, ids};
}

at::Tensor seed_target_rank_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias, const at::Tensor& targets,
                                 const c10::optional<at::Tensor>& exclude_offsets,
                                 const c10::optional<at::Tensor>& exclude_ids,
                                 const c10::optional<at::Tensor>& lse) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(hidden));
  const int64_t num_items = check_catalog_args(hidden, weight, bias, /*seeded=*/true);
  check_seed_lse(lse, hidden);
  const int64_t users = hidden.size(0);
  check_targets(targets, users, num_items, hidden);
  check_exclusion_args(exclude_offsets, exclude_ids, users, num_items, hidden);
  DeviceChecks checks(hidden, "seed_target_rank");
  checks.ids_in_range(targets, 0, num_items, "targets");
  check_exclusion_values(checks, exclude_offsets, exclude_ids, num_items);
  check_seed_inputs_finite(checks, hidden, weight, bias, lse);
  const at::Tensor hidden_c = hidden.contiguous(), weight_c = weight.contiguous();
  const at::Tensor targets_c = targets.contiguous();
  const c10::optional<at::Tensor> bias_c = contiguous_or_none(bias);
  at::Tensor rank = at::zeros({users}, hidden.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, hidden.scalar_type(), "seed_target_rank_cuda", [&] {
        seed_target_rank_impl(make_seed_problem<scalar_t>(hidden_c, weight_c, bias_c), targets_c,
                              sort_exclusion(exclude_offsets, exclude_ids, users, num_items), lse,
                              rank);
      });
  checks.raise_if_failed();
  return rank;
}

}  // namespace

TORCH_LIBRARY_IMPL(diffrec_ext, CUDA, m) {
  m.impl("seed_avg_probs", &seed_avg_probs_cuda);
  m.impl("seed_topk", &seed_topk_cuda);
  m.impl("seed_target_rank", &seed_target_rank_cuda);
}

}  // namespace diffrec::cuda
