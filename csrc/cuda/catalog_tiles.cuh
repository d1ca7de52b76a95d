// Pieces shared by the catalog kernels (seed_scores.cu, catalog_xent.cu). The catalog (the rows of
// `weight`) is swept in tiles of items: one cuBLAS GEMM writes a tile's logits, in the accumulation
// dtype, into a reusable buffer [rows, tile], and small fused kernels consume it. Nothing of size
// [rows, V] is ever allocated, so the extra memory is the tile buffer plus O(rows).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <type_traits>

#include "device_utils.cuh"

namespace diffrec::cuda {

// MiB of per-tile scratch (the logits tile and whatever an op keeps beside it). 32 MiB keeps the
// tile mostly resident in the 50 MB L2 of an H100/H200 between the GEMM that writes it and the
// kernel that reads it, and every op well under 64 MB of extra memory.
constexpr int64_t kDefaultTileScratchMiB = 32;

// The scratch budget in bytes: DIFFREC_CUDA_TILE_MIB when set, else the default. Read on every
// call, so a benchmark can sweep it within one process (larger tiles mean fewer launches, smaller
// ones a better L2 fit).
inline int64_t tile_scratch_bytes() {
  const char* setting = std::getenv("DIFFREC_CUDA_TILE_MIB");
  if (setting == nullptr || *setting == '\0') return kDefaultTileScratchMiB << 20;
  char* end = nullptr;
  const long long mib = std::strtoll(setting, &end, 10);
  TORCH_CHECK(*end == '\0' && mib >= 1 && mib <= 4096, "DIFFREC_CUDA_TILE_MIB = '", setting,
              "' must be a whole number of MiB in [1, 4096]");
  return int64_t(mib) << 20;
}

// Tile widths are multiples of this many items, so every row of the buffer is 16-byte aligned
// (quad loads) and the GEMM's n stays tensor-core friendly.
constexpr int64_t kTileAlign = 256;
constexpr int64_t kMaxTileWidth = 32768;

// Items per tile for a sweep that keeps `bytes_per_item` bytes of scratch per item of the tile.
inline int64_t catalog_tile_width(int64_t bytes_per_item, int64_t num_items) {
  int64_t width = tile_scratch_bytes() / std::max<int64_t>(bytes_per_item, 1);
  width = std::clamp<int64_t>(width / kTileAlign * kTileAlign, kTileAlign, kMaxTileWidth);
  const int64_t whole_catalog = (num_items + kTileAlign - 1) / kTileAlign * kTileAlign;
  return std::min(width, whole_catalog);
}

// The kernels index items with 32-bit ints and cuBLAS takes int dimensions.
inline void check_fits_int32(int64_t value, const char* what) {
  TORCH_CHECK(value <= std::numeric_limits<int32_t>::max(), "the CUDA kernels need ", what,
              " < 2^31, got ", value);
}

template <typename T>
struct CudaDataType;
template <>
struct CudaDataType<float> {
  static constexpr cudaDataType_t value = CUDA_R_32F;
};
template <>
struct CudaDataType<double> {
  static constexpr cudaDataType_t value = CUDA_R_64F;
};
template <>
struct CudaDataType<at::BFloat16> {
  static constexpr cudaDataType_t value = CUDA_R_16BF;
};
template <>
struct CudaDataType<at::Half> {
  static constexpr cudaDataType_t value = CUDA_R_16F;
};

// Row-major C[M, N] = op(A) @ op(B) (+ C when accumulate), op = transpose where asked; A and B are
// row-major with row strides lda and ldb. cuBLAS is column-major, so it computes C^T = op(B)^T
// op(A)^T. Inputs of in_t, output of out_t (bf16/fp16 inputs may write fp32: the tensor cores
// accumulate in fp32 and nothing is rounded to bf16 on the way). fp32 inputs follow PyTorch's TF32
// setting, which getCurrentCUDABlasHandle applies to the handle (off by default).
template <typename in_t, typename out_t>
void gemm_row_major(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const in_t* A,
                    int64_t lda, const in_t* B, int64_t ldb, out_t* C, int64_t ldc,
                    bool accumulate) {
  using compute_t = at::opmath_type<in_t>;
  const compute_t alpha = 1;
  const compute_t beta = accumulate ? 1 : 0;
  const cublasComputeType_t compute =
      std::is_same_v<in_t, double> ? CUBLAS_COMPUTE_64F : CUBLAS_COMPUTE_32F;
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();  // on the current stream
  TORCH_CUDABLAS_CHECK(cublasGemmEx(
      handle, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
      static_cast<int>(N), static_cast<int>(M), static_cast<int>(K), &alpha, B,
      CudaDataType<in_t>::value, static_cast<int>(ldb), A, CudaDataType<in_t>::value,
      static_cast<int>(lda), &beta, C, CudaDataType<out_t>::value, static_cast<int>(ldc), compute,
      CUBLAS_GEMM_DEFAULT));
}

// logits[rows, width] (row stride ld) = hidden[rows, dim] @ weight[first_item : first_item +
// width, dim]^T, without the bias (the epilogues add it).
template <typename scalar_t>
void catalog_logits_tile(const scalar_t* hidden, int64_t rows, int64_t dim, const scalar_t* weight,
                         int64_t first_item, int64_t width, at::opmath_type<scalar_t>* logits,
                         int64_t ld) {
  gemm_row_major<scalar_t, at::opmath_type<scalar_t>>(false, true, rows, width, dim, hidden, dim,
                                                      weight + first_item * dim, dim, logits, ld,
                                                      false);
}

// Four consecutive items of a tile row. Tile buffers are at::empty allocations (512-byte aligned)
// with row strides that are multiples of kTileAlign, so every quad starting at a multiple of 4 is
// aligned. (A quad of doubles is two 16-byte accesses.)
template <typename T>
using Quad = Vec<T, 4>;

template <typename T>
__device__ __forceinline__ Quad<T> load_quad(const T* p) {
  return load_vec<T, 4>(p);
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }

// exp(x) for x <= 0 inside a log-sum-exp: every term is <= 1 and only their sum is kept, and the
// sum is shared by all items of a row, so __expf's few-ulp error (and its flush of terms below
// 1e-38, far under the sum's rounding) moves the lse by rounding only and cannot reorder items.
// Scores that are ranked (pass 2) use the accurate exp_acc.
__device__ __forceinline__ float exp_in_sum(float x) { return __expf(x); }
__device__ __forceinline__ double exp_in_sum(double x) { return exp(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t negative_infinity() {
  return -std::numeric_limits<acc_t>::infinity();
}

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t bias_at(const scalar_t* bias, int64_t item) {
  return bias == nullptr ? acc_t(0) : static_cast<acc_t>(bias[item]);
}

// Folds (other_max, other_sum) into the running (max, sum) of exp(x - max).
template <typename acc_t>
__device__ __forceinline__ void merge_max_sum(acc_t& max, acc_t& sum, acc_t other_max,
                                              acc_t other_sum) {
  const acc_t merged = other_max > max ? other_max : max;
  if (merged == negative_infinity<acc_t>()) return;  // both empty: exp(-inf - -inf) is NaN
  sum = sum * exp_in_sum(max - merged) + other_sum * exp_in_sum(other_max - merged);
  max = merged;
}

// One tile of an online log-sum-exp over the catalog, per row of the logits buffer.
template <typename scalar_t, typename acc_t>
struct LogSumExpTile {
  const acc_t* logits;  // [rows, ld]: this tile's raw GEMM output (no bias)
  int64_t ld;
  int64_t rows;
  int64_t width;
  int64_t first_item;
  int64_t num_items;
  int64_t span;          // columns of one block (blockIdx.y), a multiple of kLseStep
  const scalar_t* bias;  // [V] or nullptr
  acc_t* partial_max;    // [rows, gridDim.y] when the tile is split over blockIdx.y, else nullptr
  acc_t* partial_sum;
  acc_t* running_max;    // [rows], carried from tile to tile
  acc_t* running_sum;    // [rows]
  bool first_tile;
  bool last_tile;
  const int64_t* targets;  // [rows / rows_per_target] or nullptr: keep the target's raw logit
  int64_t rows_per_target;
  acc_t* target_logit;  // [rows]
  acc_t* lse;           // [rows], written on the last tile (may alias running_max)
  acc_t* loss;          // [rows] or nullptr: lse - (target logit + bias), on the last tile
};

constexpr int kWarpSize = 32;
constexpr int kLseThreads = 256;
constexpr int kLseRowsPerBlock = kLseThreads / kWarpSize;  // one warp per row
constexpr int kLseQuadsPerStep = 4;  // quads a lane loads before folding them (memory parallelism)
constexpr int64_t kLseStep = int64_t(kWarpSize) * 4 * kLseQuadsPerStep;  // columns per warp step

// Folds the row's (max, sum) over this tile into the running state; on the last tile writes the
// lse and the loss. With targets, keeps the raw logit of the row's target when it is in the tile.
template <typename scalar_t, typename acc_t>
__device__ void finish_logsumexp_row(const LogSumExpTile<scalar_t, acc_t>& p, int64_t row,
                                     acc_t run_max, acc_t run_sum) {
  if (p.targets != nullptr) {
    const int64_t column = p.targets[row / p.rows_per_target] - p.first_item;
    if (column >= 0 && column < p.width) p.target_logit[row] = p.logits[row * p.ld + column];
  }
  if (!p.first_tile) merge_max_sum(run_max, run_sum, p.running_max[row], p.running_sum[row]);
  if (!p.last_tile) {
    p.running_max[row] = run_max;
    p.running_sum[row] = run_sum;
    return;
  }
  const acc_t lse = run_max + log_acc(run_sum);
  p.lse[row] = lse;
  if (p.loss != nullptr) {
    // Target -1: the target lies in another shard of the catalog, the row's loss is its lse. A
    // target out of range fails the op's device checks; it must not read past the bias.
    const int64_t target = p.targets[row / p.rows_per_target];
    p.loss[row] = target < 0 ? lse
                  : target < p.num_items
                      ? lse - (p.target_logit[row] + bias_at<acc_t>(p.bias, target))
                      : std::numeric_limits<acc_t>::quiet_NaN();
  }
}

// Block (8 rows, columns [blockIdx.y * span, + span) of the tile): one warp per row. Unsplit
// (gridDim.y = 1), lane 0 finishes the row; split, it leaves a partial (max, sum) for
// logsumexp_merge_kernel.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kLseThreads)
    logsumexp_tile_kernel(LogSumExpTile<scalar_t, acc_t> p) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = int64_t(blockIdx.x) * kLseRowsPerBlock + threadIdx.x / kWarpSize;
  if (row >= p.rows) return;  // whole warps only
  const acc_t* line = p.logits + row * p.ld;
  const acc_t minus_inf = negative_infinity<acc_t>();
  acc_t run_max = minus_inf, run_sum = 0;
  const int64_t begin = int64_t(blockIdx.y) * p.span;
  const int64_t end = begin + p.span < p.width ? begin + p.span : p.width;
  for (int64_t base = begin + int64_t(lane) * 4; base < end; base += kLseStep) {
    acc_t x[kLseQuadsPerStep][4];
#pragma unroll
    for (int q = 0; q < kLseQuadsPerStep; ++q) {
      const int64_t j = base + int64_t(q) * kWarpSize * 4;
      Quad<acc_t> raw{};
      if (j < end) raw = load_quad(line + j);  // j + 3 < ld: ld is a multiple of 4
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        x[q][c] = j + c < end ? raw.v[c] + bias_at<acc_t>(p.bias, p.first_item + j + c)
                              : minus_inf;
      }
    }
    // Max first, then one exp per logit: no per-element rescaling.
    acc_t step_max = minus_inf;
#pragma unroll
    for (int q = 0; q < kLseQuadsPerStep; ++q)
#pragma unroll
      for (int c = 0; c < 4; ++c) step_max = x[q][c] > step_max ? x[q][c] : step_max;
    const acc_t new_max = step_max > run_max ? step_max : run_max;
    if (new_max == minus_inf) continue;
    acc_t sum = run_sum * exp_in_sum(run_max - new_max);
#pragma unroll
    for (int q = 0; q < kLseQuadsPerStep; ++q)
#pragma unroll
      for (int c = 0; c < 4; ++c) sum += exp_in_sum(x[q][c] - new_max);
    run_max = new_max;
    run_sum = sum;
  }
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const acc_t other_max = __shfl_xor_sync(0xffffffffu, run_max, offset);
    const acc_t other_sum = __shfl_xor_sync(0xffffffffu, run_sum, offset);
    merge_max_sum(run_max, run_sum, other_max, other_sum);
  }
  if (lane != 0) return;
  if (p.partial_max != nullptr) {
    p.partial_max[row * gridDim.y + blockIdx.y] = run_max;
    p.partial_sum[row * gridDim.y + blockIdx.y] = run_sum;
    return;
  }
  finish_logsumexp_row(p, row, run_max, run_sum);
}

// Thread = row: folds the row's partials of a split tile in column order (deterministic) and
// finishes the row.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kLseThreads)
    logsumexp_merge_kernel(LogSumExpTile<scalar_t, acc_t> p, int splits) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= p.rows) return;
  acc_t run_max = negative_infinity<acc_t>(), run_sum = 0;
  for (int y = 0; y < splits; ++y) {
    merge_max_sum(run_max, run_sum, p.partial_max[row * splits + y],
                  p.partial_sum[row * splits + y]);
  }
  finish_logsumexp_row(p, row, run_max, run_sum);
}

// Column splits of a tile so that the grid has about two blocks per multiprocessor: with few rows
// (catalog_xent at B = 256: 32 blocks of whole rows) the tile is cut along its columns instead.
inline int logsumexp_splits(int64_t rows, int64_t width) {
  const int64_t row_blocks = (rows + kLseRowsPerBlock - 1) / kLseRowsPerBlock;
  const int64_t wanted_blocks =
      2 * int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  const int64_t steps = (width + kLseStep - 1) / kLseStep;
  return static_cast<int>(
      std::clamp<int64_t>((wanted_blocks + row_blocks - 1) / row_blocks, 1, steps));
}

// The tile's log-sum-exp step; `partials` holds [rows, splits] maxima then sums, for the split
// case (at least 2 * rows * logsumexp_splits(rows, tile width) elements).
template <typename scalar_t, typename acc_t>
void launch_logsumexp_tile(LogSumExpTile<scalar_t, acc_t> tile, acc_t* partials,
                           cudaStream_t stream) {
  const int splits = logsumexp_splits(tile.rows, tile.width);
  const int64_t steps = (tile.width + kLseStep - 1) / kLseStep;
  tile.span = (steps + splits - 1) / splits * kLseStep;
  const int used = static_cast<int>((tile.width + tile.span - 1) / tile.span);
  if (used > 1) {
    tile.partial_max = partials;
    tile.partial_sum = partials + tile.rows * used;
  }
  const dim3 grid(static_cast<unsigned int>((tile.rows + kLseRowsPerBlock - 1) / kLseRowsPerBlock),
                  static_cast<unsigned int>(used));
  logsumexp_tile_kernel<scalar_t, acc_t><<<grid, kLseThreads, 0, stream>>>(tile);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (used > 1) {
    const int64_t blocks = (tile.rows + kLseThreads - 1) / kLseThreads;
    logsumexp_merge_kernel<scalar_t, acc_t><<<blocks, kLseThreads, 0, stream>>>(tile, used);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Runs the GEMM + online log-sum-exp sweep over the whole catalog for hidden[rows, dim]. Returns
// lse [rows]. With targets (one per rows_per_target rows), also fills target_logit [rows] with
// the raw logit of the row's target and, when loss is given, loss [rows].
template <typename scalar_t>
at::Tensor catalog_logsumexp(const scalar_t* hidden, int64_t rows, int64_t dim,
                             const scalar_t* weight, const scalar_t* bias, int64_t num_items,
                             at::Tensor& logits, int64_t tile, const int64_t* targets,
                             int64_t rows_per_target, at::opmath_type<scalar_t>* target_logit,
                             at::opmath_type<scalar_t>* loss) {
  using acc_t = at::opmath_type<scalar_t>;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor running_max = at::empty({rows}, logits.options());
  at::Tensor running_sum = at::empty({rows}, logits.options());
  at::Tensor partials = at::empty({2 * rows * logsumexp_splits(rows, tile)}, logits.options());
  for (int64_t first = 0; first < num_items; first += tile) {
    const int64_t width = std::min(tile, num_items - first);
    catalog_logits_tile(hidden, rows, dim, weight, first, width, logits.data_ptr<acc_t>(), tile);
    LogSumExpTile<scalar_t, acc_t> step{};
    step.logits = logits.data_ptr<acc_t>();
    step.ld = tile;
    step.rows = rows;
    step.width = width;
    step.first_item = first;
    step.num_items = num_items;
    step.bias = bias;
    step.running_max = running_max.data_ptr<acc_t>();
    step.running_sum = running_sum.data_ptr<acc_t>();
    step.first_tile = first == 0;
    step.last_tile = first + tile >= num_items;
    step.targets = targets;
    step.rows_per_target = rows_per_target;
    step.target_logit = target_logit;
    step.lse = running_max.data_ptr<acc_t>();
    step.loss = loss;
    launch_logsumexp_tile(step, partials.data_ptr<acc_t>(), stream);
  }
  return running_max;  // holds the lse after the last tile
}

}  // namespace diffrec::cuda
