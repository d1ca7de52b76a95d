// CPU kernels of the fused denoiser input (Eq. 7 and Eq. 14): h + pos + z_n with the last K
// positions noised, in one read of each input and one write. The step embedding z_n is computed
// per sample in double: n * w_j reaches 10^4 radians, where float32 sine loses digits.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../checks.h"

namespace diffrec {
namespace {

template <typename acc_t>
void fill_step_embedding(int64_t step, int64_t dim, acc_t* out) {
  const double log_base = std::log(10000.0);
  for (int64_t j = 0; j < dim; ++j) {
    const double freq = std::exp(-log_base * static_cast<double>(2 * (j / 2)) / dim);
    const double angle = static_cast<double>(step) * freq;
    out[j] = static_cast<acc_t>(j % 2 == 0 ? std::sin(angle) : std::cos(angle));
  }
}

at::Tensor denoiser_input_cpu(const at::Tensor& item_emb, const at::Tensor& pos_emb,
                              const at::Tensor& steps, const at::Tensor& sqrt_abar,
                              const at::Tensor& sqrt_one_minus_abar, const at::Tensor& noise,
                              const c10::optional<at::Tensor>& padding_mask,
                              int64_t noised_positions, bool add_position, bool add_step) {
  check_denoiser_input_args(item_emb, pos_emb, steps, sqrt_abar, sqrt_one_minus_abar, noise,
                            padding_mask, noised_positions);
  const int64_t batch = item_emb.size(0), length = item_emb.size(1), dim = item_emb.size(2);
  const int64_t first_noised = length - noised_positions;
  const at::Tensor h = item_emb.contiguous(), pos = pos_emb.contiguous(), eps = noise.contiguous();
  const at::Tensor step = steps.contiguous();
  const at::Tensor signal = sqrt_abar.to(at::kDouble).contiguous();
  const at::Tensor noise_scale = sqrt_one_minus_abar.to(at::kDouble).contiguous();
  const at::Tensor mask = padding_mask.has_value() ? padding_mask->contiguous() : at::Tensor();
  at::Tensor out = empty_output(h.sizes(), h.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "denoiser_input_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* h_ptr = h.data_ptr<scalar_t>();
    const scalar_t* pos_ptr = pos.data_ptr<scalar_t>();
    const scalar_t* eps_ptr = eps.data_ptr<scalar_t>();
    const int64_t* step_ptr = step.data_ptr<int64_t>();
    const bool* mask_ptr = mask.defined() ? mask.data_ptr<bool>() : nullptr;
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> z(dim, acc_t(0));
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n = step_ptr[b];
        if (add_step) fill_step_embedding(n, dim, z.data());
        const acc_t a = static_cast<acc_t>(signal.data_ptr<double>()[n]);
        const acc_t s = static_cast<acc_t>(noise_scale.data_ptr<double>()[n]);
        for (int64_t t = 0; t < length; ++t) {
          const int64_t offset = (b * length + t) * dim;
          scalar_t* dst = out_ptr + offset;
          if (mask_ptr != nullptr && mask_ptr[b * length + t]) {
            for (int64_t j = 0; j < dim; ++j) dst[j] = scalar_t(0);
            continue;
          }
          const scalar_t* src = h_ptr + offset;
          const scalar_t* y = pos_ptr + t * dim;
          const scalar_t* e = t >= first_noised
                                  ? eps_ptr + (b * noised_positions + t - first_noised) * dim
                                  : nullptr;
          for (int64_t j = 0; j < dim; ++j) {
            acc_t v = static_cast<acc_t>(src[j]);
            if (e != nullptr) v = a * v + s * static_cast<acc_t>(e[j]);
            if (add_position) v += static_cast<acc_t>(y[j]);
            v += z[j];
            dst[j] = static_cast<scalar_t>(v);
          }
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> denoiser_input_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& steps, const at::Tensor& sqrt_abar,
    const c10::optional<at::Tensor>& padding_mask, int64_t noised_positions, bool add_position) {
  check_denoiser_input_backward_args(grad_out, steps, sqrt_abar, padding_mask, noised_positions);
  const int64_t batch = grad_out.size(0), length = grad_out.size(1), dim = grad_out.size(2);
  const int64_t first_noised = length - noised_positions;
  const at::Tensor g = grad_out.contiguous(), step = steps.contiguous();
  const at::Tensor signal = sqrt_abar.to(at::kDouble).contiguous();
  const at::Tensor mask = padding_mask.has_value() ? padding_mask->contiguous() : at::Tensor();
  at::Tensor grad_item = empty_output(g.sizes(), g.options());
  at::Tensor grad_pos = empty_output({length, dim}, g.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "denoiser_input_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g_ptr = g.data_ptr<scalar_t>();
    const int64_t* step_ptr = step.data_ptr<int64_t>();
    const double* signal_ptr = signal.data_ptr<double>();
    const bool* mask_ptr = mask.defined() ? mask.data_ptr<bool>() : nullptr;
    scalar_t* item_ptr = grad_item.data_ptr<scalar_t>();
    auto padded = [&](int64_t b, int64_t t) { return mask_ptr != nullptr && mask_ptr[b * length + t]; };
    at::parallel_for(0, batch * length, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / length, t = r % length;
        const acc_t scale = padded(b, t) ? acc_t(0)
                            : t >= first_noised ? static_cast<acc_t>(signal_ptr[step_ptr[b]])
                                                : acc_t(1);
        for (int64_t j = 0; j < dim; ++j)
          item_ptr[r * dim + j] = static_cast<scalar_t>(scale * static_cast<acc_t>(g_ptr[r * dim + j]));
      }
    });
    scalar_t* pos_ptr = grad_pos.data_ptr<scalar_t>();
    // Sum over the batch per position, in a fixed order so the result is deterministic.
    at::parallel_for(0, length, 1, [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> sum(dim);
      for (int64_t t = t0; t < t1; ++t) {
        std::fill(sum.begin(), sum.end(), acc_t(0));
        if (add_position) {
          for (int64_t b = 0; b < batch; ++b) {
            if (padded(b, t)) continue;
            const scalar_t* row = g_ptr + (b * length + t) * dim;
            for (int64_t j = 0; j < dim; ++j) sum[j] += static_cast<acc_t>(row[j]);
          }
        }
        for (int64_t j = 0; j < dim; ++j) pos_ptr[t * dim + j] = static_cast<scalar_t>(sum[j]);
      }
    });
  });
  return {grad_item, grad_pos};
}

}  // namespace

TORCH_LIBRARY_IMPL(diffrec_ext, CPU, m) {
  m.impl("denoiser_input", &denoiser_input_cpu);
  m.impl("denoiser_input_backward", &denoiser_input_backward_cpu);
}

}  // namespace diffrec
