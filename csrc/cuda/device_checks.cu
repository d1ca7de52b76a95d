// The value checks of device_checks.cuh: one kernel per check, each recording its first failure
// in the op's failure word; one read of that word per op.
#include "device_checks.cuh"

#include "checks.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>

#include <algorithm>
#include <sstream>

namespace diffrec::cuda {
namespace {

constexpr int kCheckThreads = 256;
constexpr int kPositionBits = 48;  // key = check << 48 | position
constexpr uint64_t kPassed = ~uint64_t(0);

// Enough blocks to keep the memory system busy; each thread then strides over the rest.
unsigned int check_blocks(int64_t work) {
  const int64_t wanted = (work + kCheckThreads - 1) / kCheckThreads;
  const int64_t resident =
      int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  return static_cast<unsigned int>(std::clamp<int64_t>(wanted, 1, resident));
}

__global__ void ids_in_range_kernel(const int64_t* ids, int64_t n, int64_t lo, int64_t hi,
                                    uint64_t key, unsigned long long* word) {
  int64_t first_bad = -1;  // a thread's first failure only: one atomic per thread at most
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    if (ids[i] < lo || ids[i] >= hi) {
      first_bad = i;
      break;
    }
  }
  if (first_bad >= 0) record_failure(word, key + uint64_t(first_bad));
}

// offsets[0] = 0 (check key0), offsets[users] = nnz (key0 + 1 << 48), offsets[u + 1] >=
// offsets[u] (key0 + 2 << 48, position u).
__global__ void csr_offsets_kernel(const int64_t* offsets, int64_t users, int64_t nnz,
                                   uint64_t key0, unsigned long long* word) {
  const uint64_t check = uint64_t(1) << kPositionBits;
  const int64_t start = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (start == 0) {
    if (offsets[0] != 0) record_failure(word, key0);
    if (offsets[users] != nnz) record_failure(word, key0 + check);
  }
  for (int64_t u = start; u < users; u += int64_t(gridDim.x) * blockDim.x) {
    if (offsets[u + 1] < offsets[u]) {
      record_failure(word, key0 + 2 * check + uint64_t(u));
      return;
    }
  }
}

// A float is finite unless all its exponent bits are set. The data are read as raw words of
// `bits_t`, kVec to a 16-byte access where the pointer allows.
template <typename bits_t, int kVec>
__global__ void finite_kernel(const bits_t* data, int64_t n, bits_t exponent, uint64_t key,
                              unsigned long long* word) {
  struct alignas(sizeof(bits_t) * kVec) Pack {
    bits_t v[kVec];
  };
  const int64_t packs = n / kVec;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t start = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t first_bad = -1;
  for (int64_t p = start; p < packs && first_bad < 0; p += stride) {
    const Pack pack = reinterpret_cast<const Pack*>(data)[p];
#pragma unroll
    for (int c = 0; c < kVec; ++c) {
      if ((pack.v[c] & exponent) == exponent && first_bad < 0) first_bad = p * kVec + c;
    }
  }
  const int64_t tail = packs * kVec + start;  // the last n % kVec elements
  if (first_bad < 0 && tail < n && (data[tail] & exponent) == exponent) first_bad = tail;
  if (first_bad >= 0) record_failure(word, key + uint64_t(first_bad));
}

template <typename bits_t>
void launch_finite(const void* data, int64_t n, bits_t exponent, uint64_t key,
                   unsigned long long* word) {
  constexpr int kWide = 16 / sizeof(bits_t);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto* words = static_cast<const bits_t*>(data);
  if (reinterpret_cast<uintptr_t>(data) % 16 == 0) {
    finite_kernel<bits_t, kWide>
        <<<check_blocks(n / kWide + 1), kCheckThreads, 0, stream>>>(words, n, exponent, key, word);
  } else {
    finite_kernel<bits_t, 1>
        <<<check_blocks(n), kCheckThreads, 0, stream>>>(words, n, exponent, key, word);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

bool stream_is_capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

DeviceChecks::DeviceChecks(const at::Tensor& like, const char* op)
    : word_(at::full({1}, static_cast<int64_t>(kPassed), like.options().dtype(at::kLong))),
      op_(op) {}

unsigned long long* DeviceChecks::word() const {
  return reinterpret_cast<unsigned long long*>(word_.data_ptr<int64_t>());
}

uint64_t DeviceChecks::add(std::function<std::string(int64_t)> message) {
  messages_.push_back(std::move(message));
  return uint64_t(messages_.size() - 1) << kPositionBits;
}

void DeviceChecks::ids_in_range(const at::Tensor& ids, int64_t lo, int64_t hi, const char* name) {
  if (ids.numel() == 0) return;
  const at::Tensor flat = ids.contiguous().view({-1});
  const std::string what = name;
  const uint64_t key = add([flat, lo, hi, what](int64_t position) {
    std::ostringstream out;
    out << what << "[" << position << "] = " << flat[position].item<int64_t>()
        << " is out of range [" << lo << ", " << hi - 1 << "]";
    return out.str();
  });
  ids_in_range_kernel<<<check_blocks(flat.numel()), kCheckThreads, 0,
                        at::cuda::getCurrentCUDAStream()>>>(flat.data_ptr<int64_t>(),
                                                            flat.numel(), lo, hi, key, word());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void DeviceChecks::exclusion(const at::Tensor& offsets, const at::Tensor& ids, int64_t num_items) {
  const at::Tensor flat = offsets.contiguous();
  const int64_t users = flat.numel() - 1, nnz = ids.numel();
  ids_in_range(flat, 0, nnz + 1, "exclude_offsets");
  const uint64_t key0 = add([flat](int64_t) {
    return "exclude_offsets[0] = " + std::to_string(flat[0].item<int64_t>()) + " must be 0";
  });
  add([flat, users, nnz](int64_t) {
    return "exclude_offsets[" + std::to_string(users) + "] = " +
           std::to_string(flat[users].item<int64_t>()) + " must equal len(exclude_ids) = " +
           std::to_string(nnz);
  });
  add([](int64_t user) {
    return "exclude_offsets must be non-decreasing, but exclude_offsets[" +
           std::to_string(user + 1) + "] < exclude_offsets[" + std::to_string(user) + "]";
  });
  csr_offsets_kernel<<<check_blocks(users), kCheckThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      flat.data_ptr<int64_t>(), users, nnz, key0, word());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  ids_in_range(ids, 0, num_items, "exclude_ids");
}

void DeviceChecks::finite(const at::Tensor& values, const char* name) {
  if (values.numel() == 0) return;
  const at::Tensor flat = values.contiguous();
  const std::string message = non_finite_message(op_, name);
  const uint64_t key = add([message](int64_t) { return message; });
  const int64_t n = flat.numel();
  switch (flat.scalar_type()) {
    case at::kFloat:
      launch_finite<uint32_t>(flat.data_ptr(), n, 0x7F800000u, key, word());
      break;
    case at::kDouble:
      launch_finite<uint64_t>(flat.data_ptr(), n, 0x7FF0000000000000ull, key, word());
      break;
    case at::kBFloat16:
      launch_finite<uint16_t>(flat.data_ptr(), n, uint16_t(0x7F80), key, word());
      break;
    case at::kHalf:
      launch_finite<uint16_t>(flat.data_ptr(), n, uint16_t(0x7C00), key, word());
      break;
    default:
      TORCH_CHECK(false, op_, ": ", name, " must be a float tensor, got ", flat.scalar_type());
  }
}

void DeviceChecks::raise_if_failed() const {
  if (messages_.empty() || stream_is_capturing()) return;
  const auto key = static_cast<uint64_t>(word_.item<int64_t>());
  if (key == kPassed) return;
  const uint64_t check = key >> kPositionBits;
  const int64_t position = static_cast<int64_t>(key & ((uint64_t(1) << kPositionBits) - 1));
  TORCH_CHECK(false, messages_.at(check)(position));
}

}  // namespace diffrec::cuda
