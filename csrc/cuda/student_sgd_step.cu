// CUDA kernel of ltdd_fast::student_sgd_step: one fused, vectorised pass over theta, grad and grad_sum.
#include "common.cuh"

namespace ltdd_fast {
namespace cuda {
namespace {

using namespace detail;

template <typename T>
__device__ __forceinline__ void sgd_element(T t, T g, T s, acc_t<T> a, bool frozen, T& t_out, T& s_out) {
  using A = acc_t<T>;
  const A gi = frozen ? A(0) : to_acc(g);
  t_out = from_acc<T>(to_acc(t) - a * gi);
  s_out = from_acc<T>(to_acc(s) + gi);
}

// VEC > 1 needs all five pointers 16-byte aligned; the last n % VEC elements go through the scalar tail.
template <typename T, int VEC>
__global__ void student_sgd_step_kernel(const T* __restrict__ theta, const T* __restrict__ grad,
                                        const T* __restrict__ grad_sum, const acc_t<T>* __restrict__ alpha,
                                        int64_t n, int64_t frozen_start, int64_t frozen_end,
                                        T* __restrict__ theta_next, T* __restrict__ sum_next) {
  const acc_t<T> a = *alpha;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = n / VEC;
  for (int64_t vi = tid; vi < nvec; vi += stride) {
    const int64_t base = vi * VEC;
    const Vec<T, VEC> t = load_vec<T, VEC>(theta + base);
    const Vec<T, VEC> g = load_vec<T, VEC>(grad + base);
    const Vec<T, VEC> s = load_vec<T, VEC>(grad_sum + base);
    Vec<T, VEC> to, so;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int64_t i = base + j;
      sgd_element(t.v[j], g.v[j], s.v[j], a, i >= frozen_start && i < frozen_end, to.v[j], so.v[j]);
    }
    store_vec(theta_next + base, to);
    store_vec(sum_next + base, so);
  }
  for (int64_t i = nvec * VEC + tid; i < n; i += stride) {
    sgd_element(theta[i], grad[i], grad_sum[i], a, i >= frozen_start && i < frozen_end, theta_next[i],
                sum_next[i]);
  }
}

}  // namespace

template <typename T>
cudaError_t student_sgd_step(const T* theta, const T* grad, const T* grad_sum, const acc_t<T>* alpha, int64_t n,
                             int64_t frozen_start, int64_t frozen_end, T* theta_next, T* grad_sum_next,
                             cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  constexpr int kThreads = 256;
  constexpr int kVec = vec_width<T>();
  const bool vec = aligned16(theta) && aligned16(grad) && aligned16(grad_sum) && aligned16(theta_next) &&
                   aligned16(grad_sum_next);
  if (vec) {
    const unsigned blocks = grid_for(ceil_div(n, kVec), kThreads, 8192);
    student_sgd_step_kernel<T, kVec><<<blocks, kThreads, 0, stream>>>(theta, grad, grad_sum, alpha, n, frozen_start,
                                                                      frozen_end, theta_next, grad_sum_next);
  } else {
    const unsigned blocks = grid_for(n, kThreads, 8192);
    student_sgd_step_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(theta, grad, grad_sum, alpha, n, frozen_start,
                                                                   frozen_end, theta_next, grad_sum_next);
  }
  return cudaGetLastError();
}

#define LTDD_INSTANTIATE(T)                                                                                   \
  template cudaError_t student_sgd_step<T>(const T*, const T*, const T*, const acc_t<T>*, int64_t, int64_t, \
                                           int64_t, T*, T*, cudaStream_t);
LTDD_FOR_EACH_DTYPE(LTDD_INSTANTIATE)
#undef LTDD_INSTANTIATE

}  // namespace cuda
}  // namespace ltdd_fast
