// CUDA kernels of denoiser_input and denoiser_input_backward (contracts in
// diffrec_ext/reference.py). Both are bandwidth-bound: each input element is read once and each
// output element written once, with 16-byte vector accesses where d and the pointers allow.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "checks.h"
#include "device_checks.cuh"
#include "device_utils.cuh"

namespace diffrec::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kVectorsPerThread = 2;  // vectors a thread loads before it computes (forward)
constexpr int kBatchesPerStep = 4;    // samples a thread loads before it computes (backward)
// Columns of one forward block.
constexpr int64_t kColumnsPerBlock = 1024;
// Backward: samples per partial sum of grad_pos, at least; fewer partials, less extra traffic.
constexpr int64_t kMinBatchesPerGroup = 8;

// 16-byte vectors when d is a multiple of the vector and every pointer is 16-byte aligned.
template <typename scalar_t>
int vector_width(int64_t dim, std::initializer_list<const void*> pointers) {
  constexpr int kWide = 16 / sizeof(scalar_t);
  if (dim % kWide != 0) return 1;
  for (const void* p : pointers) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  }
  return kWide;
}

template <typename scalar_t>
struct DenoiserInput {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* item;       // [B, T, d]
  const scalar_t* pos;        // [T, d]
  const int64_t* steps;       // [B], or [B, K] when per_position
  const acc_t* sqrt_abar;     // [N + 1], already in the accumulation dtype
  const acc_t* sqrt_one_minus_abar;
  const acc_t* step_table;    // [N + 1, d] step embeddings, or nullptr without add_step
  const scalar_t* noise;      // [B, K, d]
  const bool* padding;        // [B, T] or nullptr
  scalar_t* out;              // [B, T, d]
  int64_t length, dim, noised, num_steps;
  int64_t rows_per_block, row_groups, column_blocks;
  bool add_position, per_position;
};

// The step of element (b, t): steps[b], or with per-position steps steps[b, t - (T - K)] on the
// noised positions and -1 (no step embedding) on the clean ones.
__device__ __forceinline__ int64_t step_of(const int64_t* steps, bool per_position, int64_t b,
                                           int64_t t, int64_t length, int64_t noised) {
  if (!per_position) return steps[b];
  const int64_t k = t - (length - noised);
  return k >= 0 ? steps[b * noised + k] : -1;
}

// frequency[j] = w_j / pi of column j of the step embedding, w_j = 10000^(-2 floor(j / 2) / d),
// once per launch in double.
__global__ void __launch_bounds__(kThreads) step_frequency_kernel(double* frequency, int64_t dim) {
  const int64_t column = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (column >= dim) return;
  constexpr double kLog10000 = 9.210340371976184;  // log(10000), as in reference.step_embedding
  constexpr double kPi = 3.141592653589793;
  frequency[column] = exp(-kLog10000 * (2.0 * double(column / 2)) / double(dim)) / kPi;
}

// table[n, j] = z_n(j), the sinusoidal step embedding of every step, computed once per launch in
// double (n * w_j reaches ~1e3 rad, where a float32 angle has lost several digits).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    step_table_kernel(acc_t* table, const double* frequency, int64_t num_steps, int64_t dim) {
  const int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= num_steps * dim) return;
  const int64_t n = e / dim, column = e % dim;
  // sin(x) = sinpi(x / pi): the reduction of sinpi is exact, so no slow path for large angles.
  double sine, cosine;
  sincospi(double(n) * frequency[column], &sine, &cosine);
  table[e] = static_cast<acc_t>(column % 2 == 0 ? sine : cosine);
}

// Block = (sample b, rows [t0, t0 + rows_per_block), columns [c0, c0 + kColumnsPerBlock)); the
// step embeddings come from the per-launch table (cached: one row per step).
template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads, 3) denoiser_input_kernel(DenoiserInput<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t column_block = blockIdx.x % a.column_blocks;
  const int64_t row_group = (blockIdx.x / a.column_blocks) % a.row_groups;
  const int64_t b = blockIdx.x / (a.column_blocks * a.row_groups);
  const int64_t c0 = column_block * kColumnsPerBlock;
  const int64_t columns = a.dim - c0 < kColumnsPerBlock ? a.dim - c0 : kColumnsPerBlock;
  const int64_t t0 = row_group * a.rows_per_block;
  const int64_t rows = std::min<int64_t>(a.rows_per_block, a.length - t0);
  const int64_t first_noised = a.length - a.noised;
  // Offsets of element (b, t, column) in item/out, pos and noise differ by per-sample constants.
  const int64_t sample_begin = b * a.length * a.dim;
  const int64_t noise_shift = (b + 1) * first_noised * a.dim;
  const int vectors_per_row = static_cast<int>(columns / kVec);
  const int vectors = static_cast<int>(rows) * vectors_per_row;
  for (int first = threadIdx.x; first < vectors; first += kThreads * kVectorsPerThread) {
    Vec<scalar_t, kVec> item[kVectorsPerThread], noise[kVectorsPerThread], pos[kVectorsPerThread];
    int64_t element[kVectorsPerThread];
    int column[kVectorsPerThread];  // within the block
    int64_t step[kVectorsPerThread];
    bool live[kVectorsPerThread], padded[kVectorsPerThread], noised[kVectorsPerThread];
#pragma unroll
    for (int u = 0; u < kVectorsPerThread; ++u) {
      const int v = first + u * kThreads;
      const int row = v / vectors_per_row;
      const int64_t t = t0 + row;
      column[u] = (v - row * vectors_per_row) * kVec;
      element[u] = sample_begin + t * a.dim + c0 + column[u];
      live[u] = v < vectors;
      noised[u] = t >= first_noised;
      step[u] = live[u] ? step_of(a.steps, a.per_position, b, t, a.length, a.noised) : -1;
      padded[u] = live[u] && a.padding != nullptr && a.padding[b * a.length + t];
      if (!live[u] || padded[u]) continue;  // padding is written as zeros, nothing to read
      item[u] = load_vec<scalar_t, kVec>(a.item + element[u]);
      if (noised[u]) noise[u] = load_vec<scalar_t, kVec>(a.noise + element[u] - noise_shift);
      if (a.add_position) pos[u] = load_vec<scalar_t, kVec>(a.pos + element[u] - sample_begin);
    }
#pragma unroll
    for (int u = 0; u < kVectorsPerThread; ++u) {
      if (!live[u]) continue;
      // A step out of range fails the op's device checks; it must not index past the schedule.
      const bool bad_step = step[u] >= a.num_steps || (noised[u] && step[u] < 0);
      Vec<scalar_t, kVec> out;
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        acc_t h = 0;
        if (bad_step) {
          h = std::numeric_limits<acc_t>::quiet_NaN();
        } else if (!padded[u]) {
          h = static_cast<acc_t>(item[u].v[i]);
          if (noised[u]) {
            h = a.sqrt_abar[step[u]] * h +
                a.sqrt_one_minus_abar[step[u]] * static_cast<acc_t>(noise[u].v[i]);
          }
          if (a.add_position) h += static_cast<acc_t>(pos[u].v[i]);
          if (a.step_table != nullptr && step[u] >= 0) {
            h += a.step_table[step[u] * a.dim + c0 + column[u] + i];
          }
        }
        out.v[i] = static_cast<scalar_t>(h);
      }
      store_vec<scalar_t, kVec>(a.out + element[u], out);
    }
  }
}

template <typename scalar_t>
struct DenoiserGrad {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad_out;  // [B, T, d]
  const int64_t* steps;      // [B], or [B, K] when per_position
  const acc_t* sqrt_abar;    // [N + 1]
  int64_t num_steps;         // N + 1
  const bool* padding;       // [B, T] or nullptr
  scalar_t* grad_item;       // [B, T, d]
  acc_t* partial_pos;        // [groups, T, d]: per-group sums of the masked gradient
  int64_t batch, length, dim, noised, batches_per_group;
  bool per_position;
};

// Thread = one vector of a [T, d] position, looping over the samples of its group (blockIdx.y):
// grad_item is the masked gradient, scaled by sqrt_abar[n] on the noised positions; with
// kSumPositions, the group's sum of the masked gradient goes to partial_pos. Fixed summation
// order, no atomics: the result is deterministic.
template <typename scalar_t, int kVec, bool kSumPositions>
__global__ void __launch_bounds__(kThreads) denoiser_grad_item_kernel(DenoiserGrad<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane = a.length * a.dim;
  const int64_t offset = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * kVec;
  if (offset >= plane) return;
  const int64_t t = offset / a.dim;  // d % kVec == 0: a vector never straddles two positions
  const bool noised = t >= a.length - a.noised;
  const int64_t begin = int64_t(blockIdx.y) * a.batches_per_group;
  const int64_t end = std::min(a.batch, begin + a.batches_per_group);
  acc_t sum[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) sum[i] = 0;
  for (int64_t first = begin; first < end; first += kBatchesPerStep) {
    Vec<scalar_t, kVec> grad[kBatchesPerStep];
    bool live[kBatchesPerStep], padded[kBatchesPerStep];
#pragma unroll
    for (int u = 0; u < kBatchesPerStep; ++u) {
      const int64_t b = first + u;
      live[u] = b < end;
      padded[u] = live[u] && a.padding != nullptr && a.padding[b * a.length + t];
      if (live[u] && !padded[u]) grad[u] = load_vec<scalar_t, kVec>(a.grad_out + b * plane + offset);
    }
#pragma unroll
    for (int u = 0; u < kBatchesPerStep; ++u) {
      if (!live[u]) continue;
      const int64_t b = first + u;
      const int64_t step = noised ? step_of(a.steps, a.per_position, b, t, a.length, a.noised) : 0;
      // A step out of range fails the op's device checks; it must not index past the schedule.
      const acc_t scale = !noised                             ? acc_t(1)
                          : step >= 0 && step < a.num_steps ? a.sqrt_abar[step]
                                                            : std::numeric_limits<acc_t>::quiet_NaN();
      Vec<scalar_t, kVec> out;
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const acc_t g = padded[u] ? acc_t(0) : static_cast<acc_t>(grad[u].v[i]);
        if constexpr (kSumPositions) sum[i] += g;
        out.v[i] = static_cast<scalar_t>(scale * g);
      }
      store_vec<scalar_t, kVec>(a.grad_item + b * plane + offset, out);
    }
  }
  if constexpr (kSumPositions) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) a.partial_pos[int64_t(blockIdx.y) * plane + offset + i] = sum[i];
  }
}

// grad_pos[e] = sum over groups of partial_pos[group, e], in group order.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    sum_position_partials_kernel(const at::opmath_type<scalar_t>* partial, int64_t groups,
                                 int64_t plane, scalar_t* grad_pos) {
  const int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= plane) return;
  at::opmath_type<scalar_t> sum = 0;
  for (int64_t g = 0; g < groups; ++g) sum += partial[g * plane + e];
  grad_pos[e] = static_cast<scalar_t>(sum);
}

template <typename scalar_t, int kVec>
void launch_denoiser_input(const DenoiserInput<scalar_t>& args, int64_t batch,
                           cudaStream_t stream) {
  const int64_t blocks = batch * args.row_groups * args.column_blocks;
  denoiser_input_kernel<scalar_t, kVec><<<blocks, kThreads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor denoiser_input_cuda(const at::Tensor& item_emb, const at::Tensor& pos_emb,
                               const at::Tensor& steps, const at::Tensor& sqrt_abar,
                               const at::Tensor& sqrt_one_minus_abar, const at::Tensor& noise,
                               const c10::optional<at::Tensor>& padding_mask,
                               int64_t noised_positions, bool add_position, bool add_step) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(item_emb));
  check_denoiser_input_args(item_emb, pos_emb, steps, sqrt_abar, sqrt_one_minus_abar, noise,
                            padding_mask, noised_positions);
  DeviceChecks checks(item_emb, "denoiser_input");
  checks.ids_in_range(steps, 0, sqrt_abar.size(0), "steps");
  const int64_t batch = item_emb.size(0), length = item_emb.size(1), dim = item_emb.size(2);
  const auto acc_type = at::toOpMathType(item_emb.scalar_type());
  const at::Tensor item = item_emb.contiguous(), pos = pos_emb.contiguous();
  const at::Tensor noise_c = noise.contiguous(), steps_c = steps.contiguous();
  // The reference rounds the schedule to the accumulation dtype before using it.
  const at::Tensor signal = sqrt_abar.to(acc_type).contiguous();
  const at::Tensor noise_scale = sqrt_one_minus_abar.to(acc_type).contiguous();
  const at::Tensor padding =
      padding_mask.has_value() ? padding_mask->contiguous() : at::Tensor();
  at::Tensor out = at::empty({batch, length, dim}, item.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, item.scalar_type(), "denoiser_input_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        DenoiserInput<scalar_t> args{};
        args.item = item.data_ptr<scalar_t>();
        args.pos = pos.data_ptr<scalar_t>();
        args.steps = steps_c.data_ptr<int64_t>();
        args.sqrt_abar = signal.data_ptr<acc_t>();
        args.sqrt_one_minus_abar = noise_scale.data_ptr<acc_t>();
        args.noise = noised_positions > 0 ? noise_c.data_ptr<scalar_t>() : nullptr;
        args.padding = padding.defined() ? padding.data_ptr<bool>() : nullptr;
        args.out = out.data_ptr<scalar_t>();
        args.length = length;
        args.dim = dim;
        args.noised = noised_positions;
        args.num_steps = sqrt_abar.size(0);
        args.add_position = add_position;
        args.per_position = steps.dim() == 2;
        const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
        at::Tensor table;
        at::Tensor frequency;
        if (add_step) {
          const int64_t num_steps = sqrt_abar.size(0);
          frequency = at::empty({dim}, item.options().dtype(at::kDouble));
          step_frequency_kernel<<<(dim + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
              frequency.data_ptr<double>(), dim);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          table = at::empty({num_steps, dim}, item.options().dtype(acc_type));
          step_table_kernel<acc_t><<<(num_steps * dim + kThreads - 1) / kThreads, kThreads, 0,
                                     stream>>>(table.data_ptr<acc_t>(),
                                               frequency.data_ptr<double>(), num_steps, dim);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          args.step_table = table.data_ptr<acc_t>();
        }
        const int vec = vector_width<scalar_t>(dim, {args.item, args.pos, args.noise, args.out});
        // About kThreads * kVectorsPerThread vectors per block, rows spread evenly over blocks.
        args.column_blocks = (dim + kColumnsPerBlock - 1) / kColumnsPerBlock;
        const int64_t vectors_per_row = std::min(dim, kColumnsPerBlock) / vec;
        const int64_t target_rows =
            std::max<int64_t>(1, int64_t(kThreads) * kVectorsPerThread / vectors_per_row);
        args.row_groups = (length + target_rows - 1) / target_rows;
        args.rows_per_block = (length + args.row_groups - 1) / args.row_groups;
        args.row_groups = (length + args.rows_per_block - 1) / args.rows_per_block;
        if (vec == 1) {
          launch_denoiser_input<scalar_t, 1>(args, batch, stream);
        } else {
          launch_denoiser_input<scalar_t, 16 / sizeof(scalar_t)>(args, batch, stream);
        }
      });
  checks.raise_if_failed();
  return out;
}

template <typename scalar_t, int kVec>
void launch_denoiser_grad(const DenoiserGrad<scalar_t>& args, int64_t groups, bool sum_positions,
                          cudaStream_t stream) {
  const int64_t plane_vectors = args.length * args.dim / kVec;
  const dim3 grid(static_cast<unsigned int>((plane_vectors + kThreads - 1) / kThreads),
                  static_cast<unsigned int>(groups));
  if (sum_positions) {
    denoiser_grad_item_kernel<scalar_t, kVec, true><<<grid, kThreads, 0, stream>>>(args);
  } else {
    denoiser_grad_item_kernel<scalar_t, kVec, false><<<grid, kThreads, 0, stream>>>(args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> denoiser_input_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& steps, const at::Tensor& sqrt_abar,
    const c10::optional<at::Tensor>& padding_mask, int64_t noised_positions, bool add_position) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(grad_out));
  check_denoiser_input_backward_args(grad_out, steps, sqrt_abar, padding_mask, noised_positions);
  DeviceChecks checks(grad_out, "denoiser_input_backward");
  checks.ids_in_range(steps, 0, sqrt_abar.size(0), "steps");
  const int64_t batch = grad_out.size(0), length = grad_out.size(1), dim = grad_out.size(2);
  const auto acc_type = at::toOpMathType(grad_out.scalar_type());
  const at::Tensor grad = grad_out.contiguous(), steps_c = steps.contiguous();
  const at::Tensor signal = sqrt_abar.to(acc_type).contiguous();
  const at::Tensor padding =
      padding_mask.has_value() ? padding_mask->contiguous() : at::Tensor();
  at::Tensor grad_item = at::empty({batch, length, dim}, grad.options());
  at::Tensor grad_pos = add_position ? at::empty({length, dim}, grad.options())
                                     : at::zeros({length, dim}, grad.options());
  const int64_t plane = length * dim;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, grad.scalar_type(), "denoiser_input_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        DenoiserGrad<scalar_t> args{};
        args.grad_out = grad.data_ptr<scalar_t>();
        args.steps = steps_c.data_ptr<int64_t>();
        args.sqrt_abar = signal.data_ptr<acc_t>();
        args.num_steps = sqrt_abar.size(0);
        args.padding = padding.defined() ? padding.data_ptr<bool>() : nullptr;
        args.grad_item = grad_item.data_ptr<scalar_t>();
        args.batch = batch;
        args.length = length;
        args.dim = dim;
        args.noised = noised_positions;
        args.per_position = steps.dim() == 2;
        const int vec = vector_width<scalar_t>(dim, {args.grad_out, args.grad_item});
        // Split the batch into enough groups to fill the GPU, each still long enough that the
        // partial sums stay a small fraction of the traffic.
        const int64_t column_blocks = (plane / vec + kThreads - 1) / kThreads;
        const int64_t wanted_blocks =
            4 * int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
        const int64_t max_groups = std::max<int64_t>(1, batch / kMinBatchesPerGroup);
        int64_t groups = std::clamp<int64_t>((wanted_blocks + column_blocks - 1) / column_blocks,
                                             1, max_groups);
        args.batches_per_group = (batch + groups - 1) / groups;
        groups = (batch + args.batches_per_group - 1) / args.batches_per_group;
        at::Tensor partial;
        if (add_position) {
          partial = at::empty({groups, length, dim}, grad.options().dtype(acc_type));
          args.partial_pos = partial.data_ptr<acc_t>();
        }
        const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
        if (vec == 1) {
          launch_denoiser_grad<scalar_t, 1>(args, groups, add_position, stream);
        } else {
          launch_denoiser_grad<scalar_t, 16 / sizeof(scalar_t)>(args, groups, add_position,
                                                                stream);
        }
        if (add_position) {
          sum_position_partials_kernel<scalar_t><<<(plane + kThreads - 1) / kThreads, kThreads, 0,
                                                   stream>>>(args.partial_pos, groups, plane,
                                                             grad_pos.data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
  checks.raise_if_failed();
  return {grad_item, grad_pos};
}

}  // namespace

TORCH_LIBRARY_IMPL(diffrec_ext, CUDA, m) {
  m.impl("denoiser_input", &denoiser_input_cuda);
  m.impl("denoiser_input_backward", &denoiser_input_backward_cuda);
}

}  // namespace diffrec::cuda
