// Value checks of the CUDA ops without a host sync per check. The shape, dtype and device checks
// run on the host (csrc/checks.h); the checks that need the values (ids in range, CSR offsets,
// k against the items left, finite inputs) run as small kernels that record the first failure in
// one device word. The host reads that word once, after all of the op's kernels are queued, and
// raises with the message the CPU kernel gives. The kernels between are written to stay in bounds
// on invalid values, whose results are then never returned.
//
// During CUDA graph capture the word cannot be read: the checks still run but cannot raise, so the
// ops that would return wrong results on a failed check refuse the capture up front instead
// (seed_topk with a k that exclusions could leave too few items for).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace diffrec::cuda {

// True while the current CUDA stream is capturing a graph.
bool stream_is_capturing();

class DeviceChecks {
 public:
  // Builds the failure word on `like`'s device. `op` prefixes the non-finite messages.
  DeviceChecks(const at::Tensor& like, const char* op);

  // ids (int64) in [lo, hi); the message is the CPU's check_ids_in_range message.
  void ids_in_range(const at::Tensor& ids, int64_t lo, int64_t hi, const char* name);

  // The CSR exclusion list of check_exclusion_args, in its order: offsets in [0, nnz], offsets[0]
  // = 0, offsets[B] = nnz, non-decreasing, ids in [0, num_items).
  void exclusion(const at::Tensor& offsets, const at::Tensor& ids, int64_t num_items);

  // Every element of `values` (a float tensor) is finite; else "<op>: <name> contains a
  // non-finite value (nan or inf)".
  void finite(const at::Tensor& values, const char* name);

  // A check whose kernel the caller launches: it records position p as failed with
  // atomicMin(word, key + p); message(p) is built on the host, only when it failed.
  uint64_t add(std::function<std::string(int64_t)> message);
  unsigned long long* word() const;

  // Reads the word (the op's one device-to-host read) and raises the first failure. Does nothing
  // while a graph is captured.
  void raise_if_failed() const;

 private:
  at::Tensor word_;  // int64 [1]: kPassed, or key of the first failure
  const char* op_;
  std::vector<std::function<std::string(int64_t)>> messages_;
};

// Sets the failure word from a kernel: the smallest key (check order, then position) wins.
__device__ __forceinline__ void record_failure(unsigned long long* word, uint64_t key) {
  atomicMin(word, static_cast<unsigned long long>(key));
}

}  // namespace diffrec::cuda
