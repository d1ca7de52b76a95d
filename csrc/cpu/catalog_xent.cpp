// CPU kernels of the catalog cross-entropy L_rec = -log softmax(h W^T + b)[target] (Eq. 17), in
// catalog tiles so that memory stays O(B * tile): the forward keeps an online log-sum-exp per row
// and picks the target's logit from its tile; the backward recomputes each tile's logits.
// A target of -1 means "in another slice of a sharded catalog": the row's loss is then its lse
// and its gradient has no one-hot term, which is what the sharded cross-entropy combines.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "catalog_tiles.h"

namespace diffrec {
namespace {

at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> catalog_xent_cpu(const at::Tensor& hidden,
                                                    const at::Tensor& weight,
                                                    const c10::optional<at::Tensor>& bias,
                                                    const at::Tensor& targets) {
  const int64_t num_items = check_catalog_args(hidden, weight, bias, /*seeded=*/false);
  const int64_t batch = hidden.size(0);
  check_targets(targets, batch, num_items, hidden, /*allow_absent=*/true);
  const at::Tensor target = targets.contiguous();
  const int64_t* target_item = target.data_ptr<int64_t>();
  at::Tensor loss = empty_output({batch}, hidden.options().dtype(acc_type(hidden)));
  at::Tensor lse = empty_output({batch}, loss.options());
  AT_DISPATCH_FLOATING_TYPES(loss.scalar_type(), "catalog_xent_cpu", [&] {
    CatalogTiles tiles(hidden, weight, bias.has_value() ? *bias : at::Tensor(), acc_type(hidden));
    RunningLogSumExp running(batch, loss.options());
    std::vector<scalar_t> target_logit(batch, scalar_t(0));  // stays 0 for an absent target (-1)
    for (int64_t start = 0; start < num_items; start += tiles.tile()) {
      const int64_t count = std::min(tiles.tile(), num_items - start);
      const at::Tensor tile_logits = tiles.logits(start, count);
      running.add(tile_logits);
      const scalar_t* logits = tile_logits.data_ptr<scalar_t>();
      for (int64_t b = 0; b < batch; ++b) {
        const int64_t column = target_item[b] - start;
        if (target_item[b] >= 0 && column >= 0 && column < count) {
          target_logit[b] = logits[b * count + column];
        }
      }
    }
    lse.copy_(running.value(loss.scalar_type()));
    scalar_t* loss_out = loss.data_ptr<scalar_t>();
    const scalar_t* lse_out = lse.data_ptr<scalar_t>();
    for (int64_t b = 0; b < batch; ++b) loss_out[b] = lse_out[b] - target_logit[b];
  });
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> catalog_xent_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& lse) {
  const int64_t num_items = check_catalog_args(hidden, weight, bias, /*seeded=*/false);
  const int64_t batch = hidden.size(0);
  check_targets(targets, batch, num_items, hidden, /*allow_absent=*/true);
  const auto acc = acc_type(hidden);
  check_xent_backward_rows(grad_loss, lse, hidden);
  const at::Tensor target = targets.contiguous();
  const at::Tensor g = grad_loss.to(acc).contiguous(), row_lse = lse.to(acc).contiguous();
  at::Tensor grad_hidden_acc = at::zeros({batch, hidden.size(1)}, hidden.options().dtype(acc));
  at::Tensor grad_weight = empty_output(weight.sizes(), weight.options());
  at::Tensor grad_bias = empty_output({num_items}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "catalog_xent_backward_cpu", [&] {
    CatalogTiles tiles(hidden, weight, bias.has_value() ? *bias : at::Tensor(), acc);
    const int64_t* target_item = target.data_ptr<int64_t>();
    for (int64_t start = 0; start < num_items; start += tiles.tile()) {
      const int64_t count = std::min(tiles.tile(), num_items - start);
      at::Tensor weight_rows = tiles.weight_rows(start, count);
      at::Tensor grad_logits = tiles.logits(start, count, weight_rows);
      scalar_t* gl = grad_logits.data_ptr<scalar_t>();
      // In place: logits -> (softmax - onehot(target)) * grad_loss; the exponentials through
      // ATen's vectorised kernel (a scalar std::exp loop was a third of the backward).
      grad_logits.sub_(row_lse.unsqueeze(1)).exp_();
      at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          scalar_t* row = gl + b * count;
          const int64_t column = target_item[b] - start;
          if (target_item[b] >= 0 && column >= 0 && column < count) row[column] -= scalar_t(1);
        }
      });
      grad_logits.mul_(g.unsqueeze(1));
      grad_hidden_acc.addmm_(grad_logits, weight_rows);
      grad_weight.narrow(0, start, count).copy_(at::mm(grad_logits.t(), tiles.hidden()));
      grad_bias.narrow(0, start, count).copy_(grad_logits.sum(0));
    }
  });
  return {grad_hidden_acc.to(hidden.scalar_type()), grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(diffrec_ext, CPU, m) {
  m.impl("catalog_xent", &catalog_xent_cpu);
  m.impl("catalog_xent_backward", &catalog_xent_backward_cpu);
}

}  // namespace diffrec
