// Small helpers shared by the CUDA kernels of this package.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

namespace diffrec::cuda {

// The device for an op's CUDAGuard: the tensor's when it is a CUDA tensor. A CPU tensor mixed in
// then fails the shared device checks with a clear message instead of failing in the guard.
inline c10::optional<c10::Device> cuda_device_of(const at::Tensor& tensor) {
  return tensor.is_cuda() ? c10::optional<c10::Device>(tensor.device()) : c10::nullopt;
}

// N consecutive elements moved as one access (16 bytes at most on sm_80/sm_90).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// p must be aligned to sizeof(T) * N bytes.
template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& value) {
  *reinterpret_cast<Vec<T, N>*>(p) = value;
}

}  // namespace diffrec::cuda
