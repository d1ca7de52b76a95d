// CPU kernels of the fused denoiser input (Eq. 7 and Eq. 14): h + pos + z_n with the last K
// positions noised, in one read of each input and one write. Steps come one per sequence [B] or
// one per noised position [B, K] (contracts in diffrec_ext/reference.py). The step embedding z_n
// is computed in double: n * w_j reaches 10^4 radians, where float32 sine loses digits.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../checks.h"

namespace diffrec {
namespace {

// Frequencies w_j = 10000^(-2 floor(j / 2) / d) of the interleaved sinusoidal embedding.
std::vector<double> step_frequencies(int64_t dim) {
  const double log_base = std::log(10000.0);
  std::vector<double> freq(dim);
  for (int64_t j = 0; j < dim; ++j) freq[j] = std::exp(-log_base * static_cast<double>(2 * (j / 2)) / dim);
  return freq;
}

template <typename acc_t>
void fill_step_embedding(int64_t step, const std::vector<double>& freq, acc_t* out) {
  for (size_t j = 0; j < freq.size(); ++j) {
    const double angle = static_cast<double>(step) * freq[j];
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
  const int64_t num_steps = sqrt_abar.size(0);
  // [B, K] steps: one per noised position, whose step embedding is added there only.
  const bool per_position = steps.dim() == 2;
  const at::Tensor h = item_emb.contiguous(), pos = pos_emb.contiguous(), eps = noise.contiguous();
  const at::Tensor step = steps.contiguous();
  const at::Tensor signal = sqrt_abar.to(at::kDouble).contiguous();
  const at::Tensor noise_scale = sqrt_one_minus_abar.to(at::kDouble).contiguous();
  const at::Tensor mask = padding_mask.has_value() ? padding_mask->contiguous() : at::Tensor();
  const std::vector<double> freq = step_frequencies(dim);
  at::Tensor out = empty_output(h.sizes(), h.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "denoiser_input_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* h_ptr = h.data_ptr<scalar_t>();
    const scalar_t* pos_ptr = pos.data_ptr<scalar_t>();
    const scalar_t* eps_ptr = eps.data_ptr<scalar_t>();
    const int64_t* step_ptr = step.data_ptr<int64_t>();
    const double* signal_ptr = signal.data_ptr<double>();
    const double* noise_scale_ptr = noise_scale.data_ptr<double>();
    const bool* mask_ptr = mask.defined() ? mask.data_ptr<bool>() : nullptr;
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    // With more noised positions than steps, every step's embedding is computed once up front.
    std::vector<acc_t> table;
    if (add_step && per_position && batch * noised_positions > num_steps) {
      table.resize(num_steps * dim);
      at::parallel_for(0, num_steps, 16, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) fill_step_embedding(n, freq, table.data() + n * dim);
      });
    }
    at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> computed(dim, acc_t(0));
      // The step embedding of step n, from the table or computed into `computed`.
      auto embedding_of = [&](int64_t n) -> const acc_t* {
        if (!table.empty()) return table.data() + n * dim;
        fill_step_embedding(n, freq, computed.data());
        return computed.data();
      };
      for (int64_t b = b0; b < b1; ++b) {
        int64_t n = per_position ? -1 : step_ptr[b];
        const acc_t* z = add_step && !per_position ? embedding_of(n) : nullptr;
        for (int64_t t = 0; t < length; ++t) {
          const int64_t offset = (b * length + t) * dim;
          scalar_t* dst = out_ptr + offset;
          if (mask_ptr != nullptr && mask_ptr[b * length + t]) {
            for (int64_t j = 0; j < dim; ++j) dst[j] = scalar_t(0);
            continue;
          }
          const bool noised = t >= first_noised;
          if (per_position && noised) {
            n = step_ptr[b * noised_positions + t - first_noised];
            z = add_step ? embedding_of(n) : nullptr;
          }
          const acc_t a = noised ? static_cast<acc_t>(signal_ptr[n]) : acc_t(1);
          const acc_t s = noised ? static_cast<acc_t>(noise_scale_ptr[n]) : acc_t(0);
          const scalar_t* src = h_ptr + offset;
          const scalar_t* y = pos_ptr + t * dim;
          const scalar_t* e = noised ? eps_ptr + (b * noised_positions + t - first_noised) * dim : nullptr;
          for (int64_t j = 0; j < dim; ++j) {
            acc_t v = static_cast<acc_t>(src[j]);
            if (e != nullptr) v = a * v + s * static_cast<acc_t>(e[j]);
            if (add_position) v += static_cast<acc_t>(y[j]);
            if (z != nullptr) v += z[j];
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
  const bool per_position = steps.dim() == 2;  // [B, K]: one step per noised position
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
        const int64_t step_index = per_position ? b * noised_positions + t - first_noised : b;
        const acc_t scale = padded(b, t) ? acc_t(0)
                            : t >= first_noised ? static_cast<acc_t>(signal_ptr[step_ptr[step_index]])
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
