// CPU kernels of the seed-averaged scores of Alg. 3: score[b, v] = mean_s softmax(H[b, s] W^T + b)[v].
// seed_avg_probs and seed_target_rank make two passes over catalog tiles: pass 1 accumulates a
// log-sum-exp per (user, seed); pass 2 recomputes the logits and writes the scores or counts the
// items that beat each target. In pass 2 an item's score is bounded by exp(max_s(logit - lse))
// without any exp, so items that cannot matter are skipped before their S exponentials are taken.
// seed_topk makes one pass with a certificate (see one_pass_topk) and runs pass 2 only for the
// users it cannot certify. The dense per-tile math runs through ATen's vectorised kernels; the
// loops here only touch the few items that pass a bound.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <mutex>
#include <vector>

#include "../checks.h"
#include "catalog_tiles.h"
#include "seed_scores.h"

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
  check_seed_inputs_finite("seed_avg_probs", hidden, weight, bias, lse);
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

// The exact top-k of every user from a scorer that knows the final lse: one pass over the tiles
// with a heap per user, items skipped when their bound is below the heap's k-th score. Returns
// each user's k best, sorted (larger score first, then smaller id).
template <typename acc_t>
std::vector<std::vector<Candidate<acc_t>>> exact_pass_topk(SeedScorer<acc_t>& scorer,
                                                           std::vector<ExclusionCursor> cursors,
                                                           int64_t k) {
  using Cand = Candidate<acc_t>;
  const int64_t batch = scorer.batch;
  // One heap per user whose top is the candidate that ranks last.
  std::vector<std::vector<Cand>> heaps(batch);
  for (auto& heap : heaps) heap.reserve(k);
  const acc_t slack = static_cast<acc_t>(std::log1p(-kBoundSlack));
  scorer.for_each_tile([&](int64_t start, int64_t count, at::Tensor&, const acc_t* shifted,
                           const acc_t* bounds) {
    at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        auto& heap = heaps[b];
        const acc_t* bound = bounds + b * count;
        // Items whose bound is below the current k-th score cannot enter; -inf until full.
        auto skip_threshold = [&] {
          return static_cast<int64_t>(heap.size()) < k ? -std::numeric_limits<acc_t>::infinity()
                                                       : std::log(heap.front().value) + slack;
        };
        acc_t skip_below = skip_threshold();
        for (int64_t i = 0; i < count; ++i) {
          if (bound[i] < skip_below) continue;
          const int64_t item = start + i;
          if (cursors[b].excludes(item)) continue;
          const Cand cand{scorer.score(shifted, count, b, i), item};
          if (static_cast<int64_t>(heap.size()) < k) {
            heap.push_back(cand);
            std::push_heap(heap.begin(), heap.end(), ranks_before<acc_t>);
          } else if (ranks_before(cand, heap.front())) {
            std::pop_heap(heap.begin(), heap.end(), ranks_before<acc_t>);
            heap.back() = cand;
            std::push_heap(heap.begin(), heap.end(), ranks_before<acc_t>);
          } else {
            continue;
          }
          skip_below = skip_threshold();
        }
      }
    });
  });
  for (auto& heap : heaps) std::sort_heap(heap.begin(), heap.end(), ranks_before<acc_t>);
  return heaps;
}

// The certificate keeps k' = max(4k, 128) logits per (user, seed). The scan costs the same for
// any k' (tiles are screened by block maxima) and a heap takes about k' (1 + ln(V / k')) entries,
// so a generous k' is cheap, while the bound it gives falls with k': at V = 50,000 and S = 10,
// seeds drawn around a common user vector certify 94% of users at k' = 64 and all at k' >= 80.
// Above k = kMaxCertifiedK the candidate records (S + 1 floats each, up to 2 S k' per user)
// would outgrow the two-pass kernel's memory, so larger k runs the two passes.
constexpr int64_t kMaxCertifiedK = 256;
constexpr int64_t kScreenBlock = 64;  // items per block maximum in the scan

int64_t kept_per_seed(int64_t k) { return std::max<int64_t>(4 * k, 128); }

std::mutex counts_mutex;
SeedTopkCounts counts_of_last_call;

void record_counts(int64_t users, int64_t certified, int64_t exact_pass) {
  const std::lock_guard<std::mutex> lock(counts_mutex);
  counts_of_last_call = {users, certified, exact_pass};
}

template <typename acc_t>
struct OnePassResult {
  at::Tensor lse;                                   // [B, S] in acc_t
  std::vector<std::vector<Candidate<acc_t>>> best;  // sorted top-k of each certified user
  std::vector<int64_t> uncertified;                 // users left to the exact pass
};

// One thread's share of the one pass: users [b0, b1) against catalog items [lo, hi).
template <typename acc_t>
struct OnePassTask {
  int64_t b0, b1, lo, hi;
  std::vector<std::vector<acc_t>> heaps;    // [(b - b0) * S + s]: min-heap of kept logits
  std::vector<std::vector<int64_t>> items;  // [b - b0]: recorded items
  std::vector<std::vector<acc_t>> logits;   // [b - b0]: their S logits, item-major
  at::Tensor lse;                           // [(b1 - b0) * S] float64, over [lo, hi)
};

// Streams one task's catalog range in tiles: per (user, seed) the online log-sum-exp and a
// min-heap of the k' largest logits among non-excluded items; every item that enters some seed's
// heap is recorded with its S logits of the same GEMM.
template <typename acc_t>
void run_one_pass_task(OnePassTask<acc_t>& task, const at::Tensor& hidden, const at::Tensor& weight,
                       const at::Tensor& bias, int64_t keep,
                       const std::vector<ExclusionCursor>& cursors) {
  const int64_t seeds = hidden.size(1), users = task.b1 - task.b0;
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  CatalogTiles tiles(hidden.narrow(0, task.b0, users).reshape({-1, hidden.size(2)}),
                     weight.narrow(0, task.lo, task.hi - task.lo),
                     bias.defined() ? bias.narrow(0, task.lo, task.hi - task.lo) : bias, acc);
  const int64_t rows = tiles.rows();
  const auto options = hidden.options().dtype(acc);
  RunningLogSumExp running(rows, options);
  at::Tensor block_max_buffer = at::empty({rows * (tiles.tile() / kScreenBlock + 1)}, options);
  at::Tensor tile_sum = at::empty({rows}, options);
  task.heaps.resize(rows);
  for (auto& heap : task.heaps) heap.reserve(keep);
  task.items.resize(users);
  task.logits.resize(users);
  auto full = [&](const std::vector<acc_t>& heap) {
    return static_cast<int64_t>(heap.size()) == keep;
  };

  // Drops the records that no seed's heap can still hold (logit_s <= the heap's minimum for
  // every seed): the bound covers them like any item never recorded.
  auto prune = [&](int64_t u) {
    const auto* heap = &task.heaps[u * seeds];
    auto& items = task.items[u];
    auto& logits = task.logits[u];
    size_t kept = 0;
    for (size_t r = 0; r < items.size(); ++r) {
      const acc_t* l = logits.data() + r * seeds;
      bool held = false;
      for (int64_t s = 0; s < seeds && !held; ++s) held = !full(heap[s]) || l[s] > heap[s].front();
      if (!held) continue;
      items[kept] = items[r];
      std::copy(l, l + seeds, logits.data() + kept * seeds);
      ++kept;
    }
    items.resize(kept);
    logits.resize(kept * seeds);
  };

  std::vector<int64_t> entered;
  for (int64_t start = 0; start < tiles.num_items(); start += tiles.tile()) {
    const int64_t count = std::min(tiles.tile(), tiles.num_items() - start);
    const int64_t first_item = task.lo + start;
    at::Tensor tile = tiles.logits(start, count);  // [rows, count]
    const int64_t blocks = count / kScreenBlock;
    at::Tensor block_max = block_max_buffer.narrow(0, 0, rows * blocks).view({rows, blocks});
    if (blocks > 0) {
      at::amax_out(block_max, tile.narrow(1, 0, blocks * kScreenBlock).view({rows, blocks, kScreenBlock}), {2});
    }
    const acc_t* tile_data = tile.data_ptr<acc_t>();
    const acc_t* block_data = block_max.data_ptr<acc_t>();
    for (int64_t u = 0; u < users; ++u) {
      entered.clear();
      const auto& excluded = cursors[task.b0 + u].ids;
      for (int64_t s = 0; s < seeds; ++s) {
        const int64_t row = u * seeds + s;
        auto& heap = task.heaps[row];
        const acc_t* x = tile_data + row * count;
        auto offer = [&](int64_t i) {
          if (full(heap) && !(x[i] > heap.front())) return;
          if (std::binary_search(excluded.begin(), excluded.end(), first_item + i)) return;
          if (full(heap)) {
            std::pop_heap(heap.begin(), heap.end(), std::greater<acc_t>());
            heap.back() = x[i];
          } else {
            heap.push_back(x[i]);
          }
          std::push_heap(heap.begin(), heap.end(), std::greater<acc_t>());
          entered.push_back(i);
        };
        for (int64_t block = 0; block < blocks; ++block) {
          if (full(heap) && !(block_data[row * blocks + block] > heap.front())) continue;
          for (int64_t i = block * kScreenBlock; i < (block + 1) * kScreenBlock; ++i) offer(i);
        }
        for (int64_t i = blocks * kScreenBlock; i < count; ++i) offer(i);
      }
      std::sort(entered.begin(), entered.end());
      entered.erase(std::unique(entered.begin(), entered.end()), entered.end());
      for (int64_t i : entered) {
        task.items[u].push_back(first_item + i);
        for (int64_t s = 0; s < seeds; ++s) task.logits[u].push_back(tile_data[(u * seeds + s) * count + i]);
      }
      if (static_cast<int64_t>(task.items[u].size()) > 2 * seeds * keep) prune(u);
    }
    // The tile's log-sum-exp, in place: the logits are no longer needed.
    at::Tensor row_max = blocks > 0 ? at::amax(block_max, {1}, true) : tile.amax({1}, true);
    if (blocks * kScreenBlock < count) {
      row_max = at::maximum(row_max, tile.narrow(1, blocks * kScreenBlock, count - blocks * kScreenBlock).amax({1}, true));
    }
    tile.sub_(row_max).exp_();
    at::sum_out(tile_sum, tile, {1});
    running.add_lse(tile_sum.log_().add_(row_max.squeeze(1)));
  }
  task.lse = running.value(at::kDouble);
}

// The one pass. Each thread takes a share of users (of the catalog too when there are fewer
// users than threads) and streams it without meeting the other threads: on a shared machine a
// barrier per tile waits for whichever thread is descheduled, and that cost more than the GEMM.
// At the end, per user: lse_s from the shares' log-sum-exps; tau_s, seed s's k'-th largest kept
// logit over the shares (each share's own k'-th is at most tau_s, and so is every logit it did
// not keep); the records get their exact scores (the same float operations as exact_pass_topk,
// so the same values). An item never recorded (or dropped by prune) had logit_s <= tau_s for
// every seed, so its score is at most U = (1/S) sum_s exp(tau_s - lse_s), computed with the same
// monotone float operations. A user is certified when the k-th best record beats U strictly
// (with a relative margin for the rounding of exp): then no other item can reach the top k, not
// even through a tie with a smaller id. When a seed kept fewer than k' logits over the whole
// catalog, every non-excluded item was recorded and the user is certified as is.
template <typename acc_t>
OnePassResult<acc_t> one_pass_topk(const at::Tensor& hidden, const at::Tensor& weight,
                                   const at::Tensor& bias, int64_t k,
                                   const std::vector<ExclusionCursor>& cursors) {
  using Cand = Candidate<acc_t>;
  const at::NoGradGuard no_grad;
  const int64_t batch = hidden.size(0), seeds = hidden.size(1), num_items = weight.size(0);
  const int64_t keep = kept_per_seed(k);
  const int64_t threads = at::get_num_threads();
  const int64_t user_shares = std::min(batch, threads);
  const int64_t catalog_shares = std::min(num_items, (threads + user_shares - 1) / user_shares);
  std::vector<OnePassTask<acc_t>> tasks;
  for (int64_t i = 0; i < user_shares; ++i) {
    for (int64_t j = 0; j < catalog_shares; ++j) {
      OnePassTask<acc_t> task;
      task.b0 = batch * i / user_shares;
      task.b1 = batch * (i + 1) / user_shares;
      task.lo = num_items * j / catalog_shares;
      task.hi = num_items * (j + 1) / catalog_shares;
      tasks.push_back(std::move(task));
    }
  }
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) run_one_pass_task(tasks[t], hidden, weight, bias, keep, cursors);
  });

  at::Tensor lse = at::full({batch * seeds}, -std::numeric_limits<double>::infinity(),
                            hidden.options().dtype(at::kDouble));
  for (const auto& task : tasks) {
    at::Tensor rows = lse.narrow(0, task.b0 * seeds, (task.b1 - task.b0) * seeds);
    rows.copy_(at::logaddexp(rows, task.lse));
  }
  OnePassResult<acc_t> result;
  result.lse = lse.to(c10::CppTypeToScalarType<acc_t>::value).view({batch, seeds});
  TORCH_CHECK(at::isfinite(result.lse).all().template item<bool>(),
              "seed_topk: the log-sum-exp of hidden @ weight.T + bias overflows (inputs are finite "
              "but their logits reach inf)");
  result.best.resize(batch);
  std::vector<char> certified(batch, 0);
  const acc_t* lse_data = result.lse.template data_ptr<acc_t>();
  const acc_t margin = static_cast<acc_t>(1 + kBoundSlack);
  at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> kept;
    for (int64_t b = b0; b < b1; ++b) {
      const acc_t* l = lse_data + b * seeds;
      std::vector<Cand> cands;
      for (const auto& task : tasks) {
        if (b < task.b0 || b >= task.b1) continue;
        const auto& items = task.items[b - task.b0];
        const auto& logits = task.logits[b - task.b0];
        for (size_t r = 0; r < items.size(); ++r) {
          acc_t total = 0;
          for (int64_t s = 0; s < seeds; ++s) total += std::exp(logits[r * seeds + s] - l[s]);
          cands.push_back({total / static_cast<acc_t>(seeds), items[r]});
        }
      }
      if (static_cast<int64_t>(cands.size()) < k) continue;
      std::partial_sort(cands.begin(), cands.begin() + k, cands.end(), ranks_before<acc_t>);
      bool every_item_recorded = false;
      acc_t bound = 0;
      for (int64_t s = 0; s < seeds; ++s) {
        kept.clear();
        for (const auto& task : tasks) {
          if (b < task.b0 || b >= task.b1) continue;
          const auto& heap = task.heaps[(b - task.b0) * seeds + s];
          kept.insert(kept.end(), heap.begin(), heap.end());
        }
        if (static_cast<int64_t>(kept.size()) < keep) {
          every_item_recorded = true;
          continue;
        }
        std::nth_element(kept.begin(), kept.begin() + (keep - 1), kept.end(), std::greater<acc_t>());
        bound += std::exp(kept[keep - 1] - l[s]);
      }
      bound /= static_cast<acc_t>(seeds);
      if (every_item_recorded || cands[k - 1].value > bound * margin) {
        cands.resize(k);
        result.best[b] = std::move(cands);
        certified[b] = 1;
      }
    }
  });
  for (int64_t b = 0; b < batch; ++b) {
    if (!certified[b]) result.uncertified.push_back(b);
  }
  return result;
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
  check_seed_inputs_finite("seed_topk", hidden, weight, bias, lse);
  auto cursors = exclusion_cursors(exclude_offsets, exclude_ids, batch);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t left = num_items - static_cast<int64_t>(cursors[b].ids.size());
    TORCH_CHECK(k <= left, "k = ", k, " exceeds the ", left, " items left for user ", b,
                " after excluding ", cursors[b].ids.size(), " of V = ", num_items);
  }
  at::Tensor values = empty_output({batch, k}, hidden.options().dtype(acc_type(hidden)));
  at::Tensor indices = empty_output({batch, k}, hidden.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "seed_topk_cpu", [&] {
    std::vector<std::vector<Candidate<scalar_t>>> best;
    if (lse.has_value() || k > kMaxCertifiedK) {
      // A given lse already makes this one pass, exact without a certificate.
      SeedScorer<scalar_t> scorer(hidden, weight, bias_or_undefined(bias), acc_type(hidden), lse);
      best = exact_pass_topk(scorer, cursors, k);
      record_counts(batch, 0, batch);
    } else {
      auto one_pass = one_pass_topk<scalar_t>(hidden, weight, bias_or_undefined(bias), k, cursors);
      best = std::move(one_pass.best);
      const auto& failed = one_pass.uncertified;
      if (!failed.empty()) {
        const at::Tensor users = at::tensor(failed, hidden.options().dtype(at::kLong));
        std::vector<ExclusionCursor> failed_cursors;
        for (int64_t b : failed) failed_cursors.push_back(cursors[b]);
        SeedScorer<scalar_t> scorer(hidden.index_select(0, users), weight, bias_or_undefined(bias),
                                    acc_type(hidden), one_pass.lse.index_select(0, users));
        auto second = exact_pass_topk(scorer, std::move(failed_cursors), k);
        for (size_t j = 0; j < failed.size(); ++j) best[failed[j]] = std::move(second[j]);
      }
      const int64_t exact = static_cast<int64_t>(failed.size());
      record_counts(batch, batch - exact, exact);
    }
    scalar_t* value_out = values.data_ptr<scalar_t>();
    int64_t* index_out = indices.data_ptr<int64_t>();
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t j = 0; j < k; ++j) {
        value_out[b * k + j] = best[b][j].value;
        index_out[b * k + j] = best[b][j].item;
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
  check_seed_inputs_finite("seed_target_rank", hidden, weight, bias, lse);
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

SeedTopkCounts last_seed_topk_counts() {
  const std::lock_guard<std::mutex> lock(counts_mutex);
  return counts_of_last_call;
}

TORCH_LIBRARY_IMPL(diffrec_ext, CPU, m) {
  m.impl("seed_avg_probs", &seed_avg_probs_cpu);
  m.impl("seed_topk", &seed_topk_cpu);
  m.impl("seed_target_rank", &seed_target_rank_cpu);
}

}  // namespace diffrec
