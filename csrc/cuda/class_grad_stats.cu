// CUDA kernel of ltdd_fast::class_grad_stats: per-class sum and max of per-image gradient L2 norms.
//   1. squared norms: each image's D values are split over `splits` blocks (enough blocks to fill the GPU when
//      there are few images), each writing one partial (vectorised loads where rows are 16-byte aligned);
//   2. one thread per image adds its partials in a fixed order, takes the square root and adds it into its
//      class (atomicAdd for the sum, an unsigned atomicMax on the bits of the non-negative norm for the max);
//   3. the K results are cast to the output type.
#include "common.cuh"

namespace ltdd_fast {
namespace cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;
constexpr int64_t kChunkAlign = 8;  // a multiple of every vector width, so each chunk starts aligned

int64_t splits_for(int64_t N, int64_t D) {
  if (N <= 0 || D <= 0) return 1;
  int64_t s = ceil_div(1024, N);  // about 1024 blocks in all
  const int64_t by_size = ceil_div(D, 2048);  // but at least ~2048 values per block
  if (s > by_size) s = by_size;
  return s < 1 ? 1 : s;
}

int64_t chunk_for(int64_t D, int64_t splits) { return ceil_div(ceil_div(D, splits), kChunkAlign) * kChunkAlign; }

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    row_sumsq_kernel(const T* __restrict__ grads, int64_t D, int64_t splits, int64_t chunk,
                     acc_t<T>* __restrict__ partials) {
  using A = acc_t<T>;
  __shared__ A smem[kWarp];
  const int64_t row = blockIdx.x / splits;
  const int64_t part = blockIdx.x % splits;
  const int64_t start = part * chunk;
  const int64_t end = start + chunk < D ? start + chunk : D;
  const T* p = grads + row * D;
  A acc[1] = {A(0)};
  // with VEC > 1, D and chunk are multiples of VEC, so [start, end) is whole vectors
  for (int64_t i = start + static_cast<int64_t>(threadIdx.x) * VEC; i < end; i += static_cast<int64_t>(blockDim.x) * VEC) {
    const Vec<T, VEC> x = load_vec<T, VEC>(p + i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A a = to_acc(x.v[j]);
      acc[0] += a * a;
    }
  }
  block_allreduce_sum<1>(acc, smem);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc[0];
}

template <typename A>
__global__ void class_norm_kernel(const A* __restrict__ partials, const int64_t* __restrict__ classes, int64_t N,
                                  int64_t splits, int64_t K, A* __restrict__ class_sum, A* __restrict__ class_max) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; row < N; row += stride) {
    A ss = A(0);
    for (int64_t s = 0; s < splits; ++s) ss += partials[row * splits + s];
    const A norm = sqrt_(ss);
    const int64_t k = classes[row];
    LTDD_DEVICE_CHECK(k >= 0 && k < K);
    if (k >= 0 && k < K) {
      atomicAdd(class_sum + k, norm);
      atomic_max_nonneg(class_max + k, norm);
    }
  }
}

template <typename T>
__global__ void class_stats_cast_kernel(const acc_t<T>* __restrict__ class_sum, const acc_t<T>* __restrict__ class_max,
                                        int64_t K, T* __restrict__ norm_sum, T* __restrict__ norm_max) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < K; k += stride) {
    norm_sum[k] = from_acc<T>(class_sum[k]);
    norm_max[k] = from_acc<T>(class_max[k]);
  }
}

}  // namespace

int64_t class_grad_stats_workspace_elems(int64_t N, int64_t D, int64_t K) {
  return (N > 0 ? N : 0) * splits_for(N, D) + 2 * K;
}

template <typename T>
cudaError_t class_grad_stats(const T* grads, const int64_t* classes, int64_t N, int64_t D, int64_t K,
                             acc_t<T>* workspace, T* norm_sum, T* norm_max, cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t splits = splits_for(N, D);
  A* partials = workspace;
  A* class_sum = workspace + (N > 0 ? N : 0) * splits;
  A* class_max = class_sum + K;
  // +0.0 is all zero bits: the identity of the unsigned max and the value of an empty class
  cudaError_t err = cudaMemsetAsync(class_sum, 0, sizeof(A) * 2 * K, stream);
  if (err != cudaSuccess) return err;
  if (N > 0) {
    const int64_t chunk = chunk_for(D, splits);
    const unsigned blocks = static_cast<unsigned>(N * splits);
    constexpr int kVec = vec_width<T>();
    if (aligned16(grads) && D % kVec == 0) {
      row_sumsq_kernel<T, kVec><<<blocks, kThreads, 0, stream>>>(grads, D, splits, chunk, partials);
    } else {
      row_sumsq_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(grads, D, splits, chunk, partials);
    }
    class_norm_kernel<A><<<grid_for(N, kThreads, 4096), kThreads, 0, stream>>>(partials, classes, N, splits, K,
                                                                               class_sum, class_max);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (K > 0) {
    class_stats_cast_kernel<T><<<grid_for(K, kThreads, 4096), kThreads, 0, stream>>>(class_sum, class_max, K, norm_sum,
                                                                                     norm_max);
  }
  return cudaGetLastError();
}

#define LTDD_INSTANTIATE(T)                                                                                   \
  template cudaError_t class_grad_stats<T>(const T*, const int64_t*, int64_t, int64_t, int64_t, acc_t<T>*, \
                                           T*, T*, cudaStream_t);
LTDD_FOR_EACH_DTYPE(LTDD_INSTANTIATE)
#undef LTDD_INSTANTIATE

}  // namespace cuda
}  // namespace ltdd_fast
