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
#include <tuple>

#include "checks.h"
#include "catalog_tiles.cuh"

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

enum class SeedEpilogue { kScores, kRank };

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
  acc_t* scores;                   // kScores: [group users, scores_ld], column = item - first_item
  int64_t scores_ld;
  const int64_t* targets;         // kRank: [B]
  const acc_t* target_log_score;  // kRank: [B]
  int64_t* rank;                  // kRank: [B], accumulated over tiles
};

constexpr int kAverageThreads = 256;
constexpr int64_t kAverageColumns = kAverageThreads * 4;  // one quad of items per thread
constexpr int kBitmapWords = kAverageColumns / 32;

// Sets bit c of `bitmap` when item (first_key - user * V) + c is excluded for `user`. Each thread
// looks at one slice of the user's sorted keys and scans it only if it overlaps the block's range.
__device__ void mark_excluded(uint32_t* bitmap, const int64_t* offsets, const int64_t* keys,
                              int64_t user, int64_t first_key) {
  for (int w = threadIdx.x; w < kBitmapWords; w += blockDim.x) bitmap[w] = 0;
  __syncthreads();
  const int64_t begin = offsets[user], end = offsets[user + 1];
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
    mark_excluded(excluded_bits, p.exclude_offsets, p.exclude_keys, user,
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
    const acc_t target_log_score = p.target_log_score[user];
    unsigned int beats = 0;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      if (valid[c] && !is_excluded[c] && p.first_item + j + c != target &&
          log_seed_score(rows + c, p.ld, bias[c], lse, p.seeds) >= target_log_score) {
        ++beats;
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
                                        const int64_t* targets, const acc_t* lse, int64_t users,
                                        int64_t seeds, acc_t* target_log_score) {
  const int64_t user = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (user >= users) return;
  target_log_score[user] = log_seed_score(target_logit + user * seeds, 1,
                                          bias_at<acc_t>(bias, targets[user]),
                                          lse + user * seeds, seeds);
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

template <typename scalar_t>
void seed_target_rank_impl(const SeedProblem<scalar_t>& problem, const at::Tensor& targets,
                           const SortedExclusion& exclusion,
                           const c10::optional<at::Tensor>& given_lse, at::Tensor& rank) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tile = catalog_tile_width(problem.rows() * int64_t(sizeof(acc_t)), problem.items);
  at::Tensor logits = at::empty({problem.rows(), tile}, problem.acc_options);
  at::Tensor target_logit = at::empty({problem.rows()}, problem.acc_options);
  const int64_t* target_ids = targets.data_ptr<int64_t>();
  // Pass 1 runs even with a given lse: it captures the targets' logits from the very GEMM calls
  // of pass 2, so a target and an item of equal logits compare exactly.
  at::Tensor lse = problem.logsumexp(logits, tile, target_ids, target_logit.data_ptr<acc_t>());
  if (given_lse.has_value()) lse = given_lse->contiguous().view({-1});
  at::Tensor target_log_score = at::empty({problem.users}, problem.acc_options);
  constexpr int kThreads = 128;
  target_log_score_kernel<<<(problem.users + kThreads - 1) / kThreads, kThreads, 0,
                            problem.stream>>>(target_logit.data_ptr<acc_t>(), problem.bias,
                                              target_ids, lse.data_ptr<acc_t>(), problem.users,
                                              problem.seeds, target_log_score.data_ptr<acc_t>());
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

// As the CPU kernel: k may not exceed the items a user has left after exclusion (duplicates in
// the list count once). Skipped while a CUDA graph is captured (it reads back to the host).
void check_k_within_items_left(const SortedExclusion& exclusion, int64_t k, int64_t users,
                               int64_t num_items) {
  if (!exclusion.keys.defined()) return;
  if (cuda_stream_is_capturing != nullptr && cuda_stream_is_capturing()) return;
  const at::Tensor& keys = exclusion.keys;  // sorted user * V + id
  at::Tensor first_of_run = at::ones_like(keys, keys.options().dtype(at::kLong));
  first_of_run.slice(0, 1).copy_(keys.slice(0, 1) != keys.slice(0, 0, -1));
  const at::Tensor owner = keys.div(num_items, "trunc");
  const at::Tensor excluded = at::zeros({users}, keys.options()).index_add_(0, owner, first_of_run);
  const at::Tensor too_few = (num_items - excluded) < k;
  if (!too_few.any().item<bool>()) return;
  const int64_t user = too_few.to(at::kByte).argmax().item<int64_t>();
  const int64_t user_excluded = excluded[user].item<int64_t>();
  TORCH_CHECK(false, "k = ", k, " exceeds the ", num_items - user_excluded,
              " items left for user ", user, " after excluding ", user_excluded, " of V = ",
              num_items);
}

c10::optional<at::Tensor> contiguous_or_none(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? c10::optional<at::Tensor>(t->contiguous()) : c10::nullopt;
}

at::Tensor seed_avg_probs_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias,
                               const c10::optional<at::Tensor>& lse) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(hidden));
  check_catalog_args(hidden, weight, bias, /*seeded=*/true);
  check_seed_lse(lse, hidden);
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
  const SortedExclusion exclusion = sort_exclusion(exclude_offsets, exclude_ids, users, num_items);
  check_k_within_items_left(exclusion, k, users, num_items);
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
  return rank;
}

}  // namespace

TORCH_LIBRARY_IMPL(diffrec_ext, CUDA, m) {
  m.impl("seed_avg_probs", &seed_avg_probs_cuda);
  m.impl("seed_topk", &seed_topk_cuda);
  m.impl("seed_target_rank", &seed_target_rank_cuda);
}

}  // namespace diffrec::cuda
