// CPU kernels of the seed-averaged scores of Alg. 3: score[b, v] = mean_s softmax(H[b, s] W^T + b)[v].
// Two passes over catalog tiles: pass 1 accumulates a log-sum-exp per (user, seed); pass 2
// recomputes the logits and either writes the scores (seed_avg_probs), keeps a running top-k
// (seed_topk) or counts the items that beat each target (seed_target_rank). In pass 2 an item's
// score is bounded by exp(max_s(logit - lse)) without any exp, so items that cannot matter are
// skipped before their S exponentials are taken. The dense per-tile math (log-sum-exp, the
// shift by lse, the bound) runs through ATen's vectorised kernels; the loops here only touch
// the few items that pass the bound.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../checks.h"
#include "catalog_tiles.h"

namespace diffrec {
namespace {

// Relative slack of the skip test: far above the rounding of the bound, so a skipped item is
// certainly below the threshold and the exact comparisons decide everything else.
constexpr double kBoundSlack = 1e-4;

template <typename acc_t>
struct SeedScorer {
  CatalogTiles tiles;
  int64_t batch, seeds;
  at::Tensor lse;  // [B, S, 1]
  at::Tensor shifted_buffer, bound_buffer;

  // With `known_lse` ([B, S], e.g. over a whole sharded catalog) the first pass is skipped.
  SeedScorer(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias,
             at::ScalarType acc, const c10::optional<at::Tensor>& known_lse)
      : tiles(hidden.reshape({-1, hidden.size(2)}), weight, bias, acc),
        batch(hidden.size(0)),
        seeds(hidden.size(1)) {
    const auto options = hidden.options().dtype(acc);
    if (known_lse.has_value()) {
      lse = known_lse->reshape({batch, seeds, 1}).contiguous();
    } else {
      RunningLogSumExp running(batch * seeds, options);
      for (int64_t start = 0; start < tiles.num_items(); start += tiles.tile()) {
        running.add(tiles.logits(start, std::min(tiles.tile(), tiles.num_items() - start)));
      }
      lse = running.value(acc).view({batch, seeds, 1});
    }
    shifted_buffer = at::empty({batch * seeds * tiles.tile()}, options);
    bound_buffer = at::empty({batch * tiles.tile()}, options);
  }

  const acc_t* lse_of(int64_t b) const { return lse.data_ptr<acc_t>() + b * seeds; }

  // Calls fn(start, count, shifted, bound) per tile: shifted[(b * S + s) * count + i] =
  // logit - lse[b, s] and bound[b * count + i] = max_s shifted, the log of an upper bound on
  // the item's averaged score.
  template <typename TileFn>
  void for_each_tile(TileFn&& fn) {
    const at::NoGradGuard no_grad;
    for (int64_t start = 0; start < tiles.num_items(); start += tiles.tile()) {
      const int64_t count = std::min(tiles.tile(), tiles.num_items() - start);
      at::Tensor logits = tiles.logits(start, count).view({batch, seeds, count});
      at::Tensor shifted = shifted_buffer.narrow(0, 0, batch * seeds * count).view({batch, seeds, count});
      at::sub_out(shifted, logits, lse);
      at::Tensor bound = bound_buffer.narrow(0, 0, batch * count).view({batch, count});
      at::amax_out(bound, shifted, {1});
      fn(start, count, shifted, shifted.template data_ptr<acc_t>(), bound.template data_ptr<acc_t>());
    }
  }

  // Exact seed-averaged score of item column i for user b (fixed order over seeds, so every
  // kernel computes the same value for the same item).
  acc_t score(const acc_t* shifted, int64_t count, int64_t b, int64_t i) const {
    acc_t total = 0;
    for (int64_t s = 0; s < seeds; ++s) total += std::exp(shifted[(b * seeds + s) * count + i]);
    return total / static_cast<acc_t>(seeds);
  }

  // log of the exact averaged score of one item whose shifted logit for seed s is at
  // first[s * stride]. Used where scores are compared with each other, so that probabilities
  // below float range (1e-38) still order correctly instead of tying at zero.
  acc_t log_score(const acc_t* first, int64_t stride) const {
    acc_t largest = -std::numeric_limits<acc_t>::infinity();
    for (int64_t s = 0; s < seeds; ++s) largest = std::max(largest, first[s * stride]);
    acc_t total = 0;
    for (int64_t s = 0; s < seeds; ++s) total += std::exp(first[s * stride] - largest);
    return largest + std::log(total / static_cast<acc_t>(seeds));
  }

  acc_t log_score(const acc_t* shifted, int64_t count, int64_t b, int64_t i) const {
    return log_score(shifted + b * seeds * count + i, count);
  }
};

// Per-user sorted, de-duplicated excluded ids, read in increasing item order across tiles.
struct ExclusionCursor {
  std::vector<int64_t> ids;
  size_t next = 0;

  // True when `item` is excluded; items must be asked in increasing order.
  bool excludes(int64_t item) {
    while (next < ids.size() && ids[next] < item) ++next;
    return next < ids.size() && ids[next] == item;
  }
};

std::vector<ExclusionCursor> exclusion_cursors(const c10::optional<at::Tensor>& offsets,
                                               const c10::optional<at::Tensor>& ids,
                                               int64_t batch) {
  std::vector<ExclusionCursor> cursors(batch);
  if (!offsets.has_value()) return cursors;
  const at::Tensor off = offsets->contiguous(), id = ids->contiguous();
  const int64_t* o = off.data_ptr<int64_t>();
  const int64_t* v = id.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    auto& list = cursors[b].ids;
    list.assign(v + o[b], v + o[b + 1]);
    std::sort(list.begin(), list.end());
    list.erase(std::unique(list.begin(), list.end()), list.end());
  }
  return cursors;
}

at::Tensor bias_or_undefined(const c10::optional<at::Tensor>& bias) {
  return bias.has_value() ? *bias : at::Tensor();
}

at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename acc_t>
struct Candidate {
  acc_t value;
  int64_t item;
};

// "a ranks before b": larger value first, then smaller item id.
template <typename acc_t>
bool ranks_before(const Candidate<acc_t>& a, const Candidate<acc_t>& b) {
  return a.value > b.value || (a.value == b.value && a.item < b.item);
}

at::Tensor seed_avg_probs_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias,
                              const c10::optional<at::Tensor>& lse) {
  const int64_t num_items = check_catalog_args(hidden, weight, bias, /*seeded=*/true);
  check_seed_lse(lse, hidden);
  const int64_t batch = hidden.size(0);
  at::Tensor out = empty_output({batch, num_items}, hidden.options().dtype(acc_type(hidden)));
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "seed_avg_probs_cpu", [&] {
    SeedScorer<scalar_t> scorer(hidden, weight, bias_or_undefined(bias), acc_type(hidden), lse);
    scorer.for_each_tile([&](int64_t start, int64_t count, at::Tensor& shifted, const scalar_t*,
                             const scalar_t*) {
      out.narrow(1, start, count).copy_(shifted.exp_().mean(1));
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> seed_topk_cpu(const at::Tensor& hidden,
                                                 const at::Tensor& weight,
                                                 const c10::optional<at::Tensor>& bias, int64_t k,
                                                 const c10::optional<at::Tensor>& exclude_offsets,
                                                 const c10::optional<at::Tensor>& exclude_ids,
                                                 const c10::optional<at::Tensor>& lse) {
  const int64_t num_items = check_catalog_args(hidden, weight, bias, /*seeded=*/true);
  check_seed_lse(lse, hidden);
  const int64_t batch = hidden.size(0);
  TORCH_CHECK(k >= 1 && k <= num_items, "k = ", k, " must be in [1, V = ", num_items, "]");
  check_exclusion_args(exclude_offsets, exclude_ids, batch, num_items, hidden);
  auto cursors = exclusion_cursors(exclude_offsets, exclude_ids, batch);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t left = num_items - static_cast<int64_t>(cursors[b].ids.size());
    TORCH_CHECK(k <= left, "k = ", k, " exceeds the ", left, " items left for user ", b,
                " after excluding ", cursors[b].ids.size(), " of V = ", num_items);
  }
  at::Tensor values = empty_output({batch, k}, hidden.options().dtype(acc_type(hidden)));
  at::Tensor indices = empty_output({batch, k}, hidden.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "seed_topk_cpu", [&] {
    using Cand = Candidate<scalar_t>;
    SeedScorer<scalar_t> scorer(hidden, weight, bias_or_undefined(bias), acc_type(hidden), lse);
    // One heap per user whose top is the candidate that ranks last.
    std::vector<std::vector<Cand>> heaps(batch);
    for (auto& heap : heaps) heap.reserve(k);
    const scalar_t slack = static_cast<scalar_t>(std::log1p(-kBoundSlack));
    scorer.for_each_tile([&](int64_t start, int64_t count, at::Tensor&, const scalar_t* shifted,
                             const scalar_t* bounds) {
      at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          auto& heap = heaps[b];
          const scalar_t* bound = bounds + b * count;
          // Items whose bound is below the current k-th score cannot enter; -inf until full.
          auto skip_threshold = [&] {
            return static_cast<int64_t>(heap.size()) < k
                       ? -std::numeric_limits<scalar_t>::infinity()
                       : std::log(heap.front().value) + slack;
          };
          scalar_t skip_below = skip_threshold();
          for (int64_t i = 0; i < count; ++i) {
            if (bound[i] < skip_below) continue;
            const int64_t item = start + i;
            if (cursors[b].excludes(item)) continue;
            const Cand cand{scorer.score(shifted, count, b, i), item};
            if (static_cast<int64_t>(heap.size()) < k) {
              heap.push_back(cand);
              std::push_heap(heap.begin(), heap.end(), ranks_before<scalar_t>);
            } else if (ranks_before(cand, heap.front())) {
              std::pop_heap(heap.begin(), heap.end(), ranks_before<scalar_t>);
              heap.back() = cand;
              std::push_heap(heap.begin(), heap.end(), ranks_before<scalar_t>);
            } else {
              continue;
            }
            skip_below = skip_threshold();
          }
        }
      });
    });
    scalar_t* value_out = values.data_ptr<scalar_t>();
    int64_t* index_out = indices.data_ptr<int64_t>();
    for (int64_t b = 0; b < batch; ++b) {
      auto& heap = heaps[b];
      std::sort_heap(heap.begin(), heap.end(), ranks_before<scalar_t>);
      for (int64_t j = 0; j < k; ++j) {
        value_out[b * k + j] = heap[j].value;
        index_out[b * k + j] = heap[j].item;
      }
    }
  });
  return {values, indices};
}

at::Tensor seed_target_rank_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias, const at::Tensor& targets,
                                const c10::optional<at::Tensor>& exclude_offsets,
                                const c10::optional<at::Tensor>& exclude_ids,
                                const c10::optional<at::Tensor>& lse) {
  const int64_t num_items = check_catalog_args(hidden, weight, bias, /*seeded=*/true);
  check_seed_lse(lse, hidden);
  const int64_t batch = hidden.size(0);
  check_targets(targets, batch, num_items, hidden);
  check_exclusion_args(exclude_offsets, exclude_ids, batch, num_items, hidden);
  auto cursors = exclusion_cursors(exclude_offsets, exclude_ids, batch);
  const at::Tensor target = targets.contiguous();
  const int64_t* target_item = target.data_ptr<int64_t>();
  at::Tensor ranks = empty_output({batch}, targets.options());
  AT_DISPATCH_FLOATING_TYPES(acc_type(hidden), "seed_target_rank_cpu", [&] {
    SeedScorer<scalar_t> scorer(hidden, weight, bias_or_undefined(bias), acc_type(hidden), lse);
    // The target's exact score is only known once its tile comes by. Until then each item is
    // compared with an estimate from a direct dot product: items far from it are settled at
    // once, the few close to it wait in `pending` for the exact score. All in the log domain.
    const at::Tensor hidden_acc = hidden.to(acc_type(hidden));
    at::Tensor target_rows = weight.index_select(0, target).to(acc_type(hidden));
    at::Tensor target_logits = at::einsum("bsd,bd->bs", {hidden_acc, target_rows});
    if (bias.has_value()) {
      target_logits += bias->index_select(0, target).to(acc_type(hidden)).unsqueeze(1);
    }
    target_logits = target_logits.contiguous();
    const scalar_t* tl = target_logits.data_ptr<scalar_t>();
    std::vector<scalar_t> estimate(batch), exact(batch), slack(batch), shifted_target(scorer.seeds);
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t s = 0; s < scorer.seeds; ++s) {
        shifted_target[s] = tl[b * scorer.seeds + s] - scorer.lse_of(b)[s];
      }
      estimate[b] = scorer.log_score(shifted_target.data(), 1);
      slack[b] = static_cast<scalar_t>(kBoundSlack) * std::max(scalar_t(1), std::abs(estimate[b]));
    }
    std::vector<int64_t> count_above(batch, 0);
    std::vector<std::vector<scalar_t>> pending(batch);
    scorer.for_each_tile([&](int64_t start, int64_t count, at::Tensor&, const scalar_t* shifted,
                             const scalar_t* bounds) {
      at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const scalar_t* bound = bounds + b * count;
          const scalar_t low = estimate[b] - slack[b], high = estimate[b] + slack[b];
          for (int64_t i = 0; i < count; ++i) {
            const int64_t item = start + i;
            if (item == target_item[b]) {
              exact[b] = scorer.log_score(shifted, count, b, i);
              continue;
            }
            if (bound[i] < low) continue;
            if (cursors[b].excludes(item)) continue;
            const scalar_t value = scorer.log_score(shifted, count, b, i);
            if (value > high) {
              ++count_above[b];
            } else if (value >= low) {
              pending[b].push_back(value);
            }
          }
        }
      });
    });
    int64_t* rank_out = ranks.data_ptr<int64_t>();
    for (int64_t b = 0; b < batch; ++b) {
      int64_t rank = count_above[b];
      for (scalar_t value : pending[b]) rank += value >= exact[b];
      rank_out[b] = rank;
    }
  });
  return ranks;
}

}  // namespace

TORCH_LIBRARY_IMPL(diffrec_ext, CPU, m) {
  m.impl("seed_avg_probs", &seed_avg_probs_cpu);
  m.impl("seed_topk", &seed_topk_cpu);
  m.impl("seed_target_rank", &seed_target_rank_cpu);
}

}  // namespace diffrec
