// CUDA kernel of ltdd_fast::scatter_add_rows_: target[index[i], :] += src[i, :] with one atomic add per element
// (or per pair / quadruple where rows are aligned: __half2 / __nv_bfloat162 atomics, and float4 atomics on sm_90),
// so repeated indices accumulate.
#include "common.cuh"

namespace ltdd_fast {
namespace cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;

template <typename T, int VEC>
struct VecAtomic {
  static __device__ __forceinline__ void add(T* p, const Vec<T, VEC>& x) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) atomic_add(p + j, x.v[j]);
  }
};

template <>
struct VecAtomic<float, 4> {
  static __device__ __forceinline__ void add(float* p, const Vec<float, 4>& x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float4*>(p), make_float4(x.v[0], x.v[1], x.v[2], x.v[3]));
#else
#pragma unroll
    for (int j = 0; j < 4; ++j) atomicAdd(p + j, x.v[j]);
#endif
  }
};

template <>
struct VecAtomic<__half, 2> {
  static __device__ __forceinline__ void add(__half* p, const Vec<__half, 2>& x) {
    atomicAdd(reinterpret_cast<__half2*>(p), __halves2half2(x.v[0], x.v[1]));
  }
};

template <>
struct VecAtomic<__nv_bfloat16, 2> {
  static __device__ __forceinline__ void add(__nv_bfloat16* p, const Vec<__nv_bfloat16, 2>& x) {
    atomicAdd(reinterpret_cast<__nv_bfloat162*>(p), __halves2bfloat162(x.v[0], x.v[1]));
  }
};

// VEC > 1 needs D % VEC == 0 and target, src aligned to VEC elements
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    scatter_add_rows_kernel(T* __restrict__ target, const int64_t* __restrict__ index, const T* __restrict__ src,
                            int64_t N, int64_t D, int64_t M) {
  const int64_t per_row = D / VEC;
  const int64_t total = N * per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t i = e / per_row;
    const int64_t c = (e - i * per_row) * VEC;
    const int64_t r = index[i];
    LTDD_DEVICE_CHECK(r >= 0 && r < M);
    if (r < 0 || r >= M) continue;
    VecAtomic<T, VEC>::add(target + r * D + c, load_vec<T, VEC>(src + i * D + c));
  }
}

template <typename T>
constexpr int atomic_width() {
  return 1;
}
template <>
constexpr int atomic_width<float>() {
  return 4;
}
template <>
constexpr int atomic_width<__half>() {
  return 2;
}
template <>
constexpr int atomic_width<__nv_bfloat16>() {
  return 2;
}

bool aligned_to(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace

template <typename T>
cudaError_t scatter_add_rows(T* target, const int64_t* index, const T* src, int64_t N, int64_t D, int64_t M,
                             cudaStream_t stream) {
  if (N <= 0 || D <= 0) return cudaSuccess;
  constexpr int kVec = atomic_width<T>();
  if (kVec > 1 && D % kVec == 0 && aligned_to(target, sizeof(T) * kVec) && aligned_to(src, sizeof(T) * kVec)) {
    scatter_add_rows_kernel<T, kVec><<<grid_for(N * (D / kVec), kThreads, 8192), kThreads, 0, stream>>>(
        target, index, src, N, D, M);
  } else {
    scatter_add_rows_kernel<T, 1><<<grid_for(N * D, kThreads, 8192), kThreads, 0, stream>>>(target, index, src, N, D,
                                                                                           M);
  }
  return cudaGetLastError();
}

#define LTDD_INSTANTIATE(T) \
  template cudaError_t scatter_add_rows<T>(T*, const int64_t*, const T*, int64_t, int64_t, int64_t, cudaStream_t);
LTDD_FOR_EACH_DTYPE(LTDD_INSTANTIATE)
#undef LTDD_INSTANTIATE

}  // namespace cuda
}  // namespace ltdd_fast
