// Schemas of every op in the diffrec_ext namespace. The CPU kernels register in csrc/cpu/, the
// CUDA kernels in csrc/cuda/, the fake (meta) kernels and autograd in diffrec_ext/ops.py, and the
// pure-PyTorch twins with the same names live in diffrec_ext/reference.py.
//
// The seed ops take an optional `lse` [B, S]: the log-normaliser of each (user, seed) softmax. When
// given, the first pass over the catalog is skipped and `weight` may be one slice of a catalog
// sharded across processes (lse then covers the whole catalog). catalog_xent accepts target -1
// for "the target is not in this slice of the catalog".
#include <torch/library.h>

TORCH_LIBRARY(diffrec_ext, m) {
  m.def(
      "denoiser_input(Tensor item_emb, Tensor pos_emb, Tensor steps, Tensor sqrt_abar, "
      "Tensor sqrt_one_minus_abar, Tensor noise, Tensor? padding_mask, int noised_positions, "
      "bool add_position, bool add_step) -> Tensor");
  m.def(
      "denoiser_input_backward(Tensor grad_out, Tensor steps, Tensor sqrt_abar, "
      "Tensor? padding_mask, int noised_positions, bool add_position) -> (Tensor, Tensor)");
  m.def("seed_avg_probs(Tensor hidden, Tensor weight, Tensor? bias, Tensor? lse=None) -> Tensor");
  m.def(
      "seed_topk(Tensor hidden, Tensor weight, Tensor? bias, int k, Tensor? exclude_offsets, "
      "Tensor? exclude_ids, Tensor? lse=None) -> (Tensor, Tensor)");
  m.def(
      "seed_target_rank(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, "
      "Tensor? exclude_offsets, Tensor? exclude_ids, Tensor? lse=None) -> Tensor");
  m.def(
      "catalog_xent(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets) "
      "-> (Tensor, Tensor)");
  m.def(
      "catalog_xent_backward(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor? bias, "
      "Tensor targets, Tensor lse) -> (Tensor, Tensor, Tensor)");
  m.def("seeded_dropout(Tensor input, float p, int seed) -> Tensor");
}

// Autocast: these ops run at the dtypes they are given (each op's own rule: fp32, or bf16/fp16 with
// fp32 accumulation), never re-cast by an enclosing torch.autocast. Without this the autocast keys
// fall through, stay enabled inside the kernels, and turn the kernels' internal ATen GEMMs to bf16,
// which then no longer match the fp32 buffers around them.
namespace {
void run_without_autocast(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  op.callBoxed(stack);
}

void register_without_autocast(torch::Library& m) {
  for (const char* name : {"denoiser_input", "denoiser_input_backward", "seed_avg_probs", "seed_topk",
                           "seed_target_rank", "catalog_xent", "catalog_xent_backward", "seeded_dropout"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&run_without_autocast>());
  }
}
}  // namespace

TORCH_LIBRARY_IMPL(diffrec_ext, AutocastCPU, m) { register_without_autocast(m); }
TORCH_LIBRARY_IMPL(diffrec_ext, AutocastCUDA, m) { register_without_autocast(m); }
