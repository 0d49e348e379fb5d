// Device helpers shared by the ltdd_fast kernels: precision conversions, vector loads, warp/block reductions,
// atomics. Written against the flags torch passes to nvcc (__CUDA_NO_HALF_CONVERSIONS__ and friends), so every
// half/bfloat16 conversion is an explicit intrinsic.
#pragma once

#include <cassert>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launchers.h"

namespace ltdd_fast {
namespace cuda {
namespace detail {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ---- conversions ----------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ acc_t<T> to_acc(T x) {
  return static_cast<acc_t<T>>(x);
}
template <>
__device__ __forceinline__ float to_acc<__half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> x) {
  return static_cast<T>(x);
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// precision-matched math (the float overloads become the fast intrinsics under --use_fast_math)
__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log_(float x) { return logf(x); }
__device__ __forceinline__ double log_(double x) { return log(x); }
__device__ __forceinline__ float sqrt_(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_(double x) { return sqrt(x); }
__device__ __forceinline__ float max_(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_(double a, double b) { return fmax(a, b); }
template <typename A>
__device__ __forceinline__ A neg_inf();
template <>
__device__ __forceinline__ float neg_inf<float>() { return -INFINITY; }
template <>
__device__ __forceinline__ double neg_inf<double>() { return -static_cast<double>(INFINITY); }

// ---- vector loads -----------------------------------------------------------------------------------------

// 16 bytes per access where every pointer involved is 16-byte aligned
template <typename T>
constexpr int vec_width() {
  return static_cast<int>(16 / sizeof(T));
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& x) {
  *reinterpret_cast<Vec<T, N>*>(p) = x;
}

inline bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// ---- reductions ---------------------------------------------------------------------------------------------

// Sum over aligned groups of G lanes (G a power of two <= 32); every lane of the group gets the result. All 32
// lanes of the warp must call it.
template <int G, int NV, typename A>
__device__ __forceinline__ void group_allreduce_sum_warp(A (&v)[NV]) {
#pragma unroll
  for (int o = G / 2; o > 0; o >>= 1) {
#pragma unroll
    for (int j = 0; j < NV; ++j) v[j] += __shfl_xor_sync(kFullMask, v[j], o);
  }
}

// Block-wide sum; every thread gets the result. blockDim.x must be a multiple of 32, smem holds >= 32 * NV.
// Safe to call repeatedly with the same smem.
template <int NV, typename A>
__device__ __forceinline__ void block_allreduce_sum(A (&v)[NV], A* smem) {
  group_allreduce_sum_warp<kWarp, NV>(v);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  __syncthreads();  // the previous call's readers are done with smem
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < NV; ++j) smem[warp * NV + j] = v[j];
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < NV; ++j) v[j] = lane < nwarps ? smem[lane * NV + j] : A(0);
  group_allreduce_sum_warp<kWarp, NV>(v);
}

// Online softmax state (running max m, sum s of exp(x - m)).
template <typename A>
__device__ __forceinline__ void online_add(A& m, A& s, A x) {
  if (x > m) {
    s = s * exp_(m - x) + A(1);  // m = -inf: s * 0
    m = x;
  } else {
    s += (x == m) ? A(1) : exp_(x - m);  // x == m also covers -inf == -inf, where x - m is NaN
  }
}
template <typename A>
__device__ __forceinline__ void online_merge(A& m, A& s, A m2, A s2) {
  const A mn = max_(m, m2);
  const A a = (m == mn) ? s : s * exp_(m - mn);
  const A b = (m2 == mn) ? s2 : s2 * exp_(m2 - mn);
  m = mn;
  s = a + b;
}

template <int G, int NV, typename A>
__device__ __forceinline__ void group_allreduce_softmax_warp(A (&m)[NV], A (&s)[NV]) {
#pragma unroll
  for (int o = G / 2; o > 0; o >>= 1) {
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const A m2 = __shfl_xor_sync(kFullMask, m[j], o);
      const A s2 = __shfl_xor_sync(kFullMask, s[j], o);
      online_merge(m[j], s[j], m2, s2);
    }
  }
}

// smem holds >= 64 * NV
template <int NV, typename A>
__device__ __forceinline__ void block_allreduce_softmax(A (&m)[NV], A (&s)[NV], A* smem) {
  group_allreduce_softmax_warp<kWarp, NV>(m, s);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  __syncthreads();
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      smem[(warp * NV + j) * 2] = m[j];
      smem[(warp * NV + j) * 2 + 1] = s[j];
    }
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    m[j] = lane < nwarps ? smem[(lane * NV + j) * 2] : neg_inf<A>();
    s[j] = lane < nwarps ? smem[(lane * NV + j) * 2 + 1] : A(0);
  }
  group_allreduce_softmax_warp<kWarp, NV>(m, s);
}

// ---- atomics ------------------------------------------------------------------------------------------------

__device__ __forceinline__ void atomic_add(float* p, float x) { atomicAdd(p, x); }
__device__ __forceinline__ void atomic_add(double* p, double x) { atomicAdd(p, x); }
__device__ __forceinline__ void atomic_add(__half* p, __half x) { atomicAdd(p, x); }
__device__ __forceinline__ void atomic_add(__nv_bfloat16* p, __nv_bfloat16 x) { atomicAdd(p, x); }

// max of non-negative values (or NaN, which wins): their IEEE bit patterns order like unsigned integers
__device__ __forceinline__ void atomic_max_nonneg(float* p, float x) {
  atomicMax(reinterpret_cast<unsigned int*>(p), __float_as_uint(x));
}
__device__ __forceinline__ void atomic_max_nonneg(double* p, double x) {
  atomicMax(reinterpret_cast<unsigned long long*>(p), static_cast<unsigned long long>(__double_as_longlong(x)));
}

// ---- launch shapes ------------------------------------------------------------------------------------------

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline unsigned grid_for(int64_t work_items, int threads, int64_t max_blocks) {
  int64_t blocks = ceil_div(work_items, threads);
  if (blocks < 1) blocks = 1;
  if (blocks > max_blocks) blocks = max_blocks;
  return static_cast<unsigned>(blocks);
}

}  // namespace detail
}  // namespace cuda
}  // namespace ltdd_fast

// X(T) for every dtype the launchers are built for (launchers.h): each .cu file's explicit instantiations are
// LTDD_FOR_EACH_DTYPE(LTDD_INSTANTIATE), so the list lives here once.
#define LTDD_FOR_EACH_DTYPE(X) X(float) X(double) X(__half) X(__nv_bfloat16)

// An index outside its range: assert in builds without NDEBUG (the kernel then skips the row either way, so a
// bad index never writes outside an allocation).
#define LTDD_DEVICE_CHECK(cond) assert(cond)
