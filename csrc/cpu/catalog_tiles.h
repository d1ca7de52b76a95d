// Logits of a catalog tile, shared by the CPU seed-scoring and cross-entropy kernels.
// The GEMM goes to ATen's BLAS (MKL/oneDNN); the kernels fuse everything after it. Memory stays
// O(rows * tile): no [rows, V] tensor is ever formed.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace diffrec {

// About 8 MB of accumulation-dtype logits per tile: large enough for an efficient GEMM, small
// enough to stay in the last-level cache on most machines.
inline int64_t catalog_tile_size(int64_t rows, int64_t num_items) {
  const int64_t budget = (int64_t{8} << 20) / 4;
  return std::min(num_items, std::max<int64_t>(256, budget / std::max<int64_t>(rows, 1)));
}

class CatalogTiles {
 public:
  // hidden: [rows, d] in any float dtype; weight: [V, d]; bias: [V] or undefined.
  CatalogTiles(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias,
               at::ScalarType acc)
      : acc_(acc),
        hidden_(hidden.to(acc).contiguous()),
        weight_(weight.contiguous()),
        bias_(bias.defined() ? bias.to(acc).contiguous() : bias),
        rows_(hidden.size(0)),
        num_items_(weight.size(0)),
        tile_(catalog_tile_size(rows_, num_items_)),
        logits_(at::empty({rows_ * tile_}, hidden.options().dtype(acc))) {
    if (weight_.scalar_type() != acc) {
      weight_tile_ = at::empty({tile_, weight.size(1)}, weight.options().dtype(acc));
    }
  }

  int64_t tile() const { return tile_; }
  int64_t num_items() const { return num_items_; }
  int64_t rows() const { return rows_; }
  const at::Tensor& hidden() const { return hidden_; }

  // Weight rows [start, start + count) in the accumulation dtype.
  at::Tensor weight_rows(int64_t start, int64_t count) {
    at::Tensor rows = weight_.narrow(0, start, count);
    if (!weight_tile_.defined()) return rows;
    at::Tensor converted = weight_tile_.narrow(0, 0, count);
    converted.copy_(rows);
    return converted;
  }

  // Logits [rows, count] (contiguous, row stride = count) of items [start, start + count).
  at::Tensor logits(int64_t start, int64_t count, const at::Tensor& weight_rows_acc) {
    at::Tensor out = logits_.narrow(0, 0, rows_ * count).view({rows_, count});
    at::mm_out(out, hidden_, weight_rows_acc.t());
    if (bias_.defined()) out.add_(bias_.narrow(0, start, count));
    return out;
  }

  at::Tensor logits(int64_t start, int64_t count) {
    return logits(start, count, weight_rows(start, count));
  }

 private:
  // Declared first so it covers every ATen call of the tiles: the ops may be called on tensors
  // that require grad (their autograd is registered in Python, around these kernels).
  at::NoGradGuard no_grad_;
  at::ScalarType acc_;
  at::Tensor hidden_, weight_, bias_;
  int64_t rows_, num_items_, tile_;
  at::Tensor logits_, weight_tile_;
};

// Log-sum-exp of every row over all tiles: each tile's log-sum-exp comes from ATen's vectorised
// kernel, and the tiles are combined in double so a catalog of millions keeps float32 precision.
class RunningLogSumExp {
 public:
  RunningLogSumExp(int64_t rows, const at::TensorOptions& options)
      : total_(at::full({rows}, -std::numeric_limits<double>::infinity(),
                        options.dtype(at::kDouble))),
        tile_(at::empty({rows}, options)) {}

  void add(const at::Tensor& logits) {
    at::logsumexp_out(tile_, logits, {1});
    add_lse(tile_);
  }

  // Adds the rows' log-sum-exp over one tile, computed by the caller.
  void add_lse(const at::Tensor& tile_lse) {
    total_ = at::logaddexp(total_, tile_lse.to(at::kDouble));
  }

  // [rows] in dtype
  at::Tensor value(at::ScalarType dtype) const { return total_.to(dtype); }

 private:
  at::NoGradGuard no_grad_;
  at::Tensor total_, tile_;
};

}  // namespace diffrec
