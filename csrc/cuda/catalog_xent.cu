// CUDA kernels of catalog_xent and catalog_xent_backward: cross-entropy over the whole catalog
// without a [B, V] logits tensor (contracts in diffrec_ext/reference.py). Memory is O(B * tile).
//
// Forward: the catalog sweep of catalog_tiles.cuh (GEMM tile + online log-sum-exp), which also
// keeps each row's target logit; loss = lse - logit[target]. A target of -1 (in another shard of
// a sharded catalog) gives loss = lse, and no one-hot term in the backward.
// Backward, per tile: the logits GEMM again; one kernel turns them into
// grad_logits = (exp(logit - lse) - onehot(target)) * grad_loss and sums its columns into
// grad_bias (fp32, fixed order); then two GEMMs: grad_hidden += grad_logits @ W_tile (into an fp32
// accumulator) and grad_W[tile] = grad_logits^T @ hidden. For bf16/fp16 parameters grad_logits
// is handed to those GEMMs in the parameter dtype, as the tensor cores need, and they accumulate
// in fp32.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "catalog_tiles.cuh"
#include "checks.h"
#include "device_checks.cuh"

namespace diffrec::cuda {
namespace {

constexpr int kGradColumnThreads = 32;  // threadIdx.x: one quad of columns each
constexpr int kGradRowThreads = 8;      // threadIdx.y: rows y, y + 8, ...
constexpr int kGradRowsPerStep = 4;     // rows a thread loads before it computes
constexpr int64_t kGradColumnsPerBlock = kGradColumnThreads * 4;

template <typename scalar_t, typename acc_t>
struct SoftmaxGradTile {
  const acc_t* logits;  // [rows, ld]: this tile's raw GEMM output
  int64_t ld;
  int64_t rows;
  int64_t width;
  int64_t first_item;
  const scalar_t* bias;      // [V] or nullptr
  const acc_t* lse;          // [rows]
  const acc_t* grad_loss;    // [rows]
  const int64_t* targets;    // [rows]
  scalar_t* grad_logits;     // [rows, ld]; the logits buffer itself when scalar_t == acc_t
  scalar_t* grad_bias;       // [V]
};

// Block = 128 columns of the tile, 8 row lanes; each thread walks rows y, y + 8, ... of its quad
// of columns and keeps the quad's column sums; the 8 lanes' sums are then added in lane order.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kGradColumnThreads * kGradRowThreads)
    softmax_grad_tile_kernel(SoftmaxGradTile<scalar_t, acc_t> p) {
  __shared__ acc_t lane_sums[kGradRowThreads][kGradColumnsPerBlock];
  const int local = threadIdx.x * 4;
  const int64_t j = int64_t(blockIdx.x) * kGradColumnsPerBlock + local;
  const bool any_column = j < p.width;
  const bool whole_quad = j + 3 < p.width;
  acc_t bias[4], sum[4];
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    bias[c] = j + c < p.width ? bias_at<acc_t>(p.bias, p.first_item + j + c) : acc_t(0);
    sum[c] = 0;
  }
  constexpr int64_t kStep = int64_t(kGradRowThreads) * kGradRowsPerStep;
  for (int64_t first_row = threadIdx.y; any_column && first_row < p.rows; first_row += kStep) {
    Quad<acc_t> raw[kGradRowsPerStep];
#pragma unroll
    for (int u = 0; u < kGradRowsPerStep; ++u) {
      const int64_t row = first_row + int64_t(u) * kGradRowThreads;
      if (row < p.rows) raw[u] = load_quad(p.logits + row * p.ld + j);
    }
#pragma unroll
    for (int u = 0; u < kGradRowsPerStep; ++u) {
      const int64_t row = first_row + int64_t(u) * kGradRowThreads;
      if (row >= p.rows) continue;
      const acc_t lse = p.lse[row];
      const acc_t scale = p.grad_loss[row];
      // In [0, 4) when the target is in this quad; never for target -1 (another shard).
      const int64_t target_column = p.targets[row] - p.first_item - j;
      Vec<scalar_t, 4> grad;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const acc_t softmax = exp_acc((raw[u].v[c] + bias[c]) - lse);
        const acc_t value = (target_column == c ? softmax - acc_t(1) : softmax) * scale;
        if (j + c < p.width) sum[c] += value;
        grad.v[c] = static_cast<scalar_t>(value);
      }
      scalar_t* out = p.grad_logits + row * p.ld + j;
      if (whole_quad) {
        store_vec<scalar_t, 4>(out, grad);
      } else {
        for (int c = 0; c < 4 && j + c < p.width; ++c) out[c] = grad.v[c];
      }
    }
  }
#pragma unroll
  for (int c = 0; c < 4; ++c) lane_sums[threadIdx.y][local + c] = sum[c];
  __syncthreads();
  if (threadIdx.y != 0) return;
  for (int c = 0; c < 4 && j + c < p.width; ++c) {
    acc_t total = 0;
#pragma unroll
    for (int y = 0; y < kGradRowThreads; ++y) total += lane_sums[y][local + c];
    p.grad_bias[p.first_item + j + c] = static_cast<scalar_t>(total);
  }
}

c10::optional<at::Tensor> contiguous_or_none(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? c10::optional<at::Tensor>(t->contiguous()) : c10::nullopt;
}

std::tuple<at::Tensor, at::Tensor> catalog_xent_cuda(const at::Tensor& hidden,
                                                     const at::Tensor& weight,
                                                     const c10::optional<at::Tensor>& bias,
                                                     const at::Tensor& targets) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(hidden));
  const int64_t num_items = check_catalog_args(hidden, weight, bias, /*seeded=*/false);
  const int64_t batch = hidden.size(0), dim = hidden.size(1);
  check_targets(targets, batch, num_items, hidden, /*allow_absent=*/true);
  check_fits_int32(num_items, "the number of items V");
  check_fits_int32(batch, "B");
  DeviceChecks checks(hidden, "catalog_xent");
  checks.ids_in_range(targets, -1, num_items, "targets");
  const at::Tensor hidden_c = hidden.contiguous(), weight_c = weight.contiguous();
  const at::Tensor targets_c = targets.contiguous();
  const c10::optional<at::Tensor> bias_c = contiguous_or_none(bias);
  const auto acc_options = hidden.options().dtype(at::toOpMathType(hidden.scalar_type()));
  at::Tensor loss = at::empty({batch}, acc_options);
  at::Tensor lse;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, hidden.scalar_type(), "catalog_xent_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const int64_t tile = catalog_tile_width(batch * int64_t(sizeof(acc_t)), num_items);
        at::Tensor logits = at::empty({batch, tile}, acc_options);
        at::Tensor target_logit = at::empty({batch}, acc_options);
        lse = catalog_logsumexp(hidden_c.data_ptr<scalar_t>(), batch, dim,
                                weight_c.data_ptr<scalar_t>(),
                                bias_c.has_value() ? bias_c->data_ptr<scalar_t>() : nullptr,
                                num_items, logits, tile, targets_c.data_ptr<int64_t>(),
                                /*rows_per_target=*/1, target_logit.data_ptr<acc_t>(),
                                loss.data_ptr<acc_t>());
      });
  checks.raise_if_failed();
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> catalog_xent_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& lse) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(hidden));
  const int64_t num_items = check_catalog_args(hidden, weight, bias, /*seeded=*/false);
  const int64_t batch = hidden.size(0), dim = hidden.size(1);
  check_targets(targets, batch, num_items, hidden, /*allow_absent=*/true);
  check_xent_backward_rows(grad_loss, lse, hidden);
  check_fits_int32(num_items, "the number of items V");
  check_fits_int32(batch, "B");
  DeviceChecks checks(hidden, "catalog_xent_backward");
  checks.ids_in_range(targets, -1, num_items, "targets");
  const auto acc_type = at::toOpMathType(hidden.scalar_type());
  const auto acc_options = hidden.options().dtype(acc_type);
  const at::Tensor hidden_c = hidden.contiguous(), weight_c = weight.contiguous();
  const at::Tensor targets_c = targets.contiguous();
  const c10::optional<at::Tensor> bias_c = contiguous_or_none(bias);
  const at::Tensor grad_loss_c = grad_loss.to(acc_type).contiguous();
  const at::Tensor lse_c = lse.to(acc_type).contiguous();
  at::Tensor grad_hidden = at::empty({batch, dim}, hidden_c.options());
  at::Tensor grad_weight = at::empty({num_items, dim}, weight_c.options());
  at::Tensor grad_bias = at::empty({num_items}, weight_c.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, hidden.scalar_type(), "catalog_xent_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        constexpr bool kGradInPlace = std::is_same_v<scalar_t, acc_t>;
        const int64_t bytes_per_item =
            batch * int64_t(sizeof(acc_t) + (kGradInPlace ? 0 : sizeof(scalar_t)));
        const int64_t tile = catalog_tile_width(bytes_per_item, num_items);
        at::Tensor logits = at::empty({batch, tile}, acc_options);
        at::Tensor grad_logits =
            kGradInPlace ? logits : at::empty({batch, tile}, hidden_c.options());
        at::Tensor grad_hidden_acc =
            kGradInPlace ? grad_hidden : at::empty({batch, dim}, acc_options);
        const scalar_t* hidden_ptr = hidden_c.data_ptr<scalar_t>();
        const scalar_t* weight_ptr = weight_c.data_ptr<scalar_t>();
        scalar_t* grad_logits_ptr = grad_logits.data_ptr<scalar_t>();
        const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
        for (int64_t first = 0; first < num_items; first += tile) {
          const int64_t width = std::min(tile, num_items - first);
          catalog_logits_tile(hidden_ptr, batch, dim, weight_ptr, first, width,
                              logits.data_ptr<acc_t>(), tile);
          SoftmaxGradTile<scalar_t, acc_t> step{};
          step.logits = logits.data_ptr<acc_t>();
          step.ld = tile;
          step.rows = batch;
          step.width = width;
          step.first_item = first;
          step.bias = bias_c.has_value() ? bias_c->data_ptr<scalar_t>() : nullptr;
          step.lse = lse_c.data_ptr<acc_t>();
          step.grad_loss = grad_loss_c.data_ptr<acc_t>();
          step.targets = targets_c.data_ptr<int64_t>();
          step.grad_logits = grad_logits_ptr;
          step.grad_bias = grad_bias.data_ptr<scalar_t>();
          const dim3 block(kGradColumnThreads, kGradRowThreads);
          const int64_t blocks = (width + kGradColumnsPerBlock - 1) / kGradColumnsPerBlock;
          softmax_grad_tile_kernel<scalar_t, acc_t><<<blocks, block, 0, stream>>>(step);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          // grad_hidden (+)= grad_logits[B, width] @ W_tile[width, d]
          gemm_row_major<scalar_t, acc_t>(false, false, batch, dim, width, grad_logits_ptr, tile,
                                          weight_ptr + first * dim, dim,
                                          grad_hidden_acc.data_ptr<acc_t>(), dim, first > 0);
          // grad_W[tile] = grad_logits[B, width]^T @ hidden[B, d]
          gemm_row_major<scalar_t, scalar_t>(true, false, width, dim, batch, grad_logits_ptr,
                                             tile, hidden_ptr, dim,
                                             grad_weight.data_ptr<scalar_t>() + first * dim, dim,
                                             false);
        }
        if (!kGradInPlace) grad_hidden.copy_(grad_hidden_acc);
      });
  checks.raise_if_failed();
  return {grad_hidden, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(diffrec_ext, CUDA, m) {
  m.impl("catalog_xent", &catalog_xent_cuda);
  m.impl("catalog_xent_backward", &catalog_xent_backward_cuda);
}

}  // namespace diffrec::cuda
