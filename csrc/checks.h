// Argument checks shared by the CPU and CUDA kernels, so both backends reject the same inputs
// with the same messages. Each message names the argument and the offending value.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <string>

namespace diffrec {

// Allocates an op's output. With DIFFREC_EXT_POISON_OUTPUTS=1 in the environment (the tests set it)
// floating outputs are filled with NaN and integer outputs with INT64_MIN first, so an element a
// kernel forgets to write fails the comparison with the reference instead of passing by luck.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// Ids (items, steps, offsets) must be int64 and lie in [lo, hi). On failure the message names
// the first offending position and its value. For CUDA tensors only the dtype is checked here:
// the CUDA ops check the values on the device, with the same messages, without a host sync per
// check (csrc/cuda/device_checks.cuh).
void check_ids_in_range(const at::Tensor& ids, int64_t lo, int64_t hi, const char* name);

void check_float_tensor(const at::Tensor& t, const char* name);
void check_same_device(const at::Tensor& reference, const at::Tensor& t, const char* ref_name,
                       const char* name);

void check_denoiser_input_args(const at::Tensor& item_emb, const at::Tensor& pos_emb,
                               const at::Tensor& steps, const at::Tensor& sqrt_abar,
                               const at::Tensor& sqrt_one_minus_abar, const at::Tensor& noise,
                               const c10::optional<at::Tensor>& padding_mask,
                               int64_t noised_positions);

void check_denoiser_input_backward_args(const at::Tensor& grad_out, const at::Tensor& steps,
                                        const at::Tensor& sqrt_abar,
                                        const c10::optional<at::Tensor>& padding_mask,
                                        int64_t noised_positions);

// hidden [B, S, d] (seed ops) or [B, d] (cross-entropy, pass seeded = false); weight [V, d];
// bias [V] or none. Returns V.
int64_t check_catalog_args(const at::Tensor& hidden, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, bool seeded);

// CSR exclusion list: both present or both absent; offsets [B + 1] non-decreasing from 0 to nnz;
// ids in [0, V). The values of CUDA tensors are checked by the CUDA ops (see check_ids_in_range).
void check_exclusion_args(const c10::optional<at::Tensor>& exclude_offsets,
                          const c10::optional<at::Tensor>& exclude_ids, int64_t batch,
                          int64_t num_items, const at::Tensor& hidden);

// targets [B] int64 in [0, V), on hidden's device; with allow_absent also -1 ("the target is in
// another slice of a sharded catalog").
void check_targets(const at::Tensor& targets, int64_t batch, int64_t num_items,
                   const at::Tensor& hidden, bool allow_absent = false);

// grad_loss [B] and lse [B] of catalog_xent_backward, on hidden's device.
void check_xent_backward_rows(const at::Tensor& grad_loss, const at::Tensor& lse,
                              const at::Tensor& hidden);

// Optional precomputed log-normalisers of the seed ops: [B, S], float64 for float64 hidden and
// float32 otherwise, on hidden's device.
void check_seed_lse(const c10::optional<at::Tensor>& lse, const at::Tensor& hidden);

// The seed ops refuse nan and inf in hidden, weight, bias and lse: a nan would reach the ranking as
// an item that compares false with everything. One message for both backends (the CUDA kernels
// raise it from a device-side flag): "<op>: <name> contains a non-finite value (nan or inf)".
std::string non_finite_message(const char* op, const char* name);

// Raises non_finite_message(op, name) when t holds nan or +-inf: one vectorised min/max pass.
void check_finite(const at::Tensor& t, const char* op, const char* name);

// check_finite on every floating input of a seed op (bias and lse when given).
void check_seed_inputs_finite(const char* op, const at::Tensor& hidden, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias,
                              const c10::optional<at::Tensor>& lse);

// seeded_dropout: a float tensor and a drop probability p in [0, 1).
void check_seeded_dropout_args(const at::Tensor& input, double p);

// floor(p * 2^32): element i is kept iff dropout_bits(seed, i) >= this (csrc/dropout_hash.h).
uint32_t dropout_threshold(double p);

}  // namespace diffrec
