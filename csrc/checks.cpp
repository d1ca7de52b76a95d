#include "checks.h"

#include <ATen/core/grad_mode.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <sstream>

namespace diffrec {

namespace {

std::string shape_of(const at::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

bool poison_outputs() {
  static const bool enabled = [] {
    const char* flag = std::getenv("DIFFREC_EXT_POISON_OUTPUTS");
    return flag != nullptr && std::strcmp(flag, "0") != 0 && flag[0] != '\0';
  }();
  return enabled;
}

// padding_mask [B, T] bool on the device of `values` ([B, T, d], named `name`).
void check_padding_mask(const c10::optional<at::Tensor>& padding_mask, const at::Tensor& values,
                        const char* name) {
  if (!padding_mask.has_value()) return;
  const auto& mask = *padding_mask;
  const int64_t batch = values.size(0), length = values.size(1);
  TORCH_CHECK(mask.scalar_type() == at::kBool, "padding_mask must be bool, got ",
              mask.scalar_type());
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == batch && mask.size(1) == length,
              "padding_mask must be [B, T] = [", batch, ", ", length, "], got shape ",
              shape_of(mask));
  check_same_device(values, mask, name, "padding_mask");
}

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  if (poison_outputs()) {
    if (at::isFloatingType(out.scalar_type())) {
      out.fill_(std::numeric_limits<double>::quiet_NaN());
    } else if (out.scalar_type() == at::kLong) {
      out.fill_(std::numeric_limits<int64_t>::min());
    }
  }
  return out;
}

void check_ids_in_range(const at::Tensor& ids, int64_t lo, int64_t hi, const char* name) {
  TORCH_CHECK(ids.scalar_type() == at::kLong, name, " must be int64, got ", ids.scalar_type());
  if (ids.numel() == 0 || ids.is_cuda()) return;  // CUDA: checked on the device by the op
  auto bad = at::logical_or(ids < lo, ids >= hi).flatten();
  if (!bad.any().item<bool>()) return;
  const int64_t position = bad.to(at::kByte).argmax().item<int64_t>();
  const int64_t value = ids.flatten()[position].item<int64_t>();
  TORCH_CHECK(false, name, "[", position, "] = ", value, " is out of range [", lo, ", ", hi - 1,
              "]");
}

void check_float_tensor(const at::Tensor& t, const char* name) {
  const auto type = t.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kDouble || type == at::kBFloat16 ||
                  type == at::kHalf,
              name, " must be float32, float64, bfloat16 or float16, got ", type);
}

void check_same_device(const at::Tensor& reference, const at::Tensor& t, const char* ref_name,
                       const char* name) {
  TORCH_CHECK(t.device() == reference.device(), name, " is on ", t.device(), " but ", ref_name,
              " is on ", reference.device());
}

// steps [B] (one step per sequence) or [B, K] (one per noised position).
static void check_denoiser_steps_shape(const at::Tensor& steps, int64_t batch,
                                       int64_t noised_positions) {
  const bool per_sequence = steps.dim() == 1 && steps.size(0) == batch;
  const bool per_position =
      steps.dim() == 2 && steps.size(0) == batch && steps.size(1) == noised_positions;
  TORCH_CHECK(per_sequence || per_position, "steps must be [B] = [", batch,
              "] or [B, noised_positions] = [", batch, ", ", noised_positions, "], got shape ",
              shape_of(steps));
}

void check_denoiser_input_args(const at::Tensor& item_emb, const at::Tensor& pos_emb,
                               const at::Tensor& steps, const at::Tensor& sqrt_abar,
                               const at::Tensor& sqrt_one_minus_abar, const at::Tensor& noise,
                               const c10::optional<at::Tensor>& padding_mask,
                               int64_t noised_positions) {
  check_float_tensor(item_emb, "item_emb");
  TORCH_CHECK(item_emb.dim() == 3, "item_emb must be [B, T, d], got shape ", shape_of(item_emb));
  const int64_t batch = item_emb.size(0), length = item_emb.size(1), dim = item_emb.size(2);
  TORCH_CHECK(batch > 0, "item_emb has an empty batch (B = 0)");
  TORCH_CHECK(length > 0 && dim > 0, "item_emb must have T > 0 and d > 0, got shape ",
              shape_of(item_emb));
  TORCH_CHECK(pos_emb.dim() == 2 && pos_emb.size(0) == length && pos_emb.size(1) == dim,
              "pos_emb must be [T, d] = [", length, ", ", dim, "], got shape ", shape_of(pos_emb));
  TORCH_CHECK(pos_emb.scalar_type() == item_emb.scalar_type(), "pos_emb dtype ",
              pos_emb.scalar_type(), " differs from item_emb dtype ", item_emb.scalar_type());
  TORCH_CHECK(noised_positions >= 0 && noised_positions <= length, "noised_positions = ",
              noised_positions, " must be in [0, T = ", length, "]");
  TORCH_CHECK(noise.dim() == 3 && noise.size(0) == batch && noise.size(1) == noised_positions &&
                  noise.size(2) == dim,
              "noise must be [B, noised_positions, d] = [", batch, ", ", noised_positions, ", ",
              dim, "], got shape ", shape_of(noise));
  TORCH_CHECK(noise.scalar_type() == item_emb.scalar_type(), "noise dtype ", noise.scalar_type(),
              " differs from item_emb dtype ", item_emb.scalar_type());
  check_denoiser_steps_shape(steps, batch, noised_positions);
  TORCH_CHECK(sqrt_abar.dim() == 1 && sqrt_abar.size(0) >= 1,
              "sqrt_abar must be [N + 1], got shape ", shape_of(sqrt_abar));
  TORCH_CHECK(sqrt_one_minus_abar.sizes() == sqrt_abar.sizes(), "sqrt_one_minus_abar shape ",
              shape_of(sqrt_one_minus_abar), " differs from sqrt_abar shape ",
              shape_of(sqrt_abar));
  check_float_tensor(sqrt_abar, "sqrt_abar");
  TORCH_CHECK(sqrt_one_minus_abar.scalar_type() == sqrt_abar.scalar_type(),
              "sqrt_one_minus_abar dtype ", sqrt_one_minus_abar.scalar_type(),
              " differs from sqrt_abar dtype ", sqrt_abar.scalar_type());
  check_same_device(item_emb, pos_emb, "item_emb", "pos_emb");
  check_same_device(item_emb, steps, "item_emb", "steps");
  check_same_device(item_emb, sqrt_abar, "item_emb", "sqrt_abar");
  check_same_device(item_emb, sqrt_one_minus_abar, "item_emb", "sqrt_one_minus_abar");
  check_same_device(item_emb, noise, "item_emb", "noise");
  check_padding_mask(padding_mask, item_emb, "item_emb");
  check_ids_in_range(steps, 0, sqrt_abar.size(0), "steps");
}

void check_denoiser_input_backward_args(const at::Tensor& grad_out, const at::Tensor& steps,
                                        const at::Tensor& sqrt_abar,
                                        const c10::optional<at::Tensor>& padding_mask,
                                        int64_t noised_positions) {
  check_float_tensor(grad_out, "grad_out");
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) > 0,
              "grad_out must be [B, T, d] with B > 0, got shape ", shape_of(grad_out));
  const int64_t batch = grad_out.size(0), length = grad_out.size(1);
  TORCH_CHECK(noised_positions >= 0 && noised_positions <= length, "noised_positions = ",
              noised_positions, " must be in [0, T = ", length, "]");
  check_denoiser_steps_shape(steps, batch, noised_positions);
  TORCH_CHECK(sqrt_abar.dim() == 1 && sqrt_abar.size(0) >= 1,
              "sqrt_abar must be [N + 1], got shape ", shape_of(sqrt_abar));
  check_float_tensor(sqrt_abar, "sqrt_abar");
  check_same_device(grad_out, steps, "grad_out", "steps");
  check_same_device(grad_out, sqrt_abar, "grad_out", "sqrt_abar");
  check_padding_mask(padding_mask, grad_out, "grad_out");
  check_ids_in_range(steps, 0, sqrt_abar.size(0), "steps");
}

int64_t check_catalog_args(const at::Tensor& hidden, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, bool seeded) {
  check_float_tensor(hidden, "hidden");
  if (seeded) {
    TORCH_CHECK(hidden.dim() == 3, "hidden must be [B, S, d], got shape ", shape_of(hidden));
    TORCH_CHECK(hidden.size(1) > 0, "hidden must have at least one seed (S > 0), got shape ",
                shape_of(hidden));
  } else {
    TORCH_CHECK(hidden.dim() == 2, "hidden must be [B, d], got shape ", shape_of(hidden));
  }
  TORCH_CHECK(hidden.size(0) > 0, "hidden has an empty batch (B = 0)");
  const int64_t dim = hidden.size(-1);
  TORCH_CHECK(dim > 0, "hidden must have d > 0, got shape ", shape_of(hidden));
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == dim, "weight must be [V, d] with d = ", dim,
              ", got shape ", shape_of(weight));
  TORCH_CHECK(weight.size(0) > 0, "weight must hold at least one item (V > 0)");
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), "weight dtype ",
              weight.scalar_type(), " differs from hidden dtype ", hidden.scalar_type());
  check_same_device(hidden, weight, "hidden", "weight");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must be [V] = [",
                weight.size(0), "], got shape ", shape_of(*bias));
    TORCH_CHECK(bias->scalar_type() == hidden.scalar_type(), "bias dtype ", bias->scalar_type(),
                " differs from hidden dtype ", hidden.scalar_type());
    check_same_device(hidden, *bias, "hidden", "bias");
  }
  return weight.size(0);
}

void check_exclusion_args(const c10::optional<at::Tensor>& exclude_offsets,
                          const c10::optional<at::Tensor>& exclude_ids, int64_t batch,
                          int64_t num_items, const at::Tensor& hidden) {
  TORCH_CHECK(exclude_offsets.has_value() == exclude_ids.has_value(),
              "exclude_offsets and exclude_ids must be given together");
  if (!exclude_offsets.has_value()) return;
  const auto& offsets = *exclude_offsets;
  const auto& ids = *exclude_ids;
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == batch + 1,
              "exclude_offsets must be [B + 1] = [", batch + 1, "], got shape ",
              shape_of(offsets));
  TORCH_CHECK(ids.dim() == 1, "exclude_ids must be 1-D, got shape ", shape_of(ids));
  check_same_device(hidden, offsets, "hidden", "exclude_offsets");
  check_same_device(hidden, ids, "hidden", "exclude_ids");
  check_ids_in_range(offsets, 0, ids.size(0) + 1, "exclude_offsets");
  if (!ids.is_cuda()) {  // CUDA: checked on the device by the op
    TORCH_CHECK(offsets[0].item<int64_t>() == 0, "exclude_offsets[0] = ",
                offsets[0].item<int64_t>(), " must be 0");
    TORCH_CHECK(offsets[batch].item<int64_t>() == ids.size(0), "exclude_offsets[", batch,
                "] = ", offsets[batch].item<int64_t>(), " must equal len(exclude_ids) = ",
                ids.size(0));
    auto drops = (offsets.slice(0, 1) < offsets.slice(0, 0, batch));
    if (drops.any().item<bool>()) {
      const int64_t at_user = drops.to(at::kByte).argmax().item<int64_t>();
      TORCH_CHECK(false, "exclude_offsets must be non-decreasing, but exclude_offsets[",
                  at_user + 1, "] < exclude_offsets[", at_user, "]");
    }
  }
  check_ids_in_range(ids, 0, num_items, "exclude_ids");
}

void check_targets(const at::Tensor& targets, int64_t batch, int64_t num_items,
                   const at::Tensor& hidden, bool allow_absent) {
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == batch, "targets must be [B] = [", batch,
              "], got shape ", shape_of(targets));
  check_same_device(hidden, targets, "hidden", "targets");
  check_ids_in_range(targets, allow_absent ? -1 : 0, num_items, "targets");
}

void check_xent_backward_rows(const at::Tensor& grad_loss, const at::Tensor& lse,
                              const at::Tensor& hidden) {
  const int64_t batch = hidden.size(0);
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == batch, "grad_loss must be [B] = [",
              batch, "], got shape ", shape_of(grad_loss));
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == batch, "lse must be [B] = [", batch,
              "], got shape ", shape_of(lse));
  check_same_device(hidden, grad_loss, "hidden", "grad_loss");
  check_same_device(hidden, lse, "hidden", "lse");
}

void check_seed_lse(const c10::optional<at::Tensor>& lse, const at::Tensor& hidden) {
  if (!lse.has_value()) return;
  const auto expected = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse->dim() == 2 && lse->size(0) == hidden.size(0) && lse->size(1) == hidden.size(1),
              "lse must be [B, S] = [", hidden.size(0), ", ", hidden.size(1), "], got shape ",
              shape_of(*lse));
  TORCH_CHECK(lse->scalar_type() == expected, "lse must be ", expected, " for ",
              hidden.scalar_type(), " hidden, got ", lse->scalar_type());
  check_same_device(hidden, *lse, "hidden", "lse");
}

std::string non_finite_message(const char* op, const char* name) {
  return std::string(op) + ": " + name + " contains a non-finite value (nan or inf)";
}

void check_finite(const at::Tensor& t, const char* op, const char* name) {
  if (t.numel() == 0) return;
  const at::NoGradGuard no_grad;
  // min and max propagate nan, so both are finite exactly when every element is.
  const auto [low, high] = at::aminmax(t);
  TORCH_CHECK(std::isfinite(low.item<double>()) && std::isfinite(high.item<double>()),
              non_finite_message(op, name));
}

void check_seed_inputs_finite(const char* op, const at::Tensor& hidden, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias,
                              const c10::optional<at::Tensor>& lse) {
  check_finite(hidden, op, "hidden");
  check_finite(weight, op, "weight");
  if (bias.has_value()) check_finite(*bias, op, "bias");
  if (lse.has_value()) check_finite(*lse, op, "lse");
}

void check_seeded_dropout_args(const at::Tensor& input, double p) {
  check_float_tensor(input, "input");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "p must be in [0, 1), got ", p);
}

uint32_t dropout_threshold(double p) { return static_cast<uint32_t>(std::floor(p * 4294967296.0)); }

}  // namespace diffrec
