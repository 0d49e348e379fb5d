// CUDA kernel of ltdd_fast::soft_ce_stats: class-weighted soft-label cross-entropy (DAM), both gradients and the
// per-class statistics. One group of G threads per row (8 or 32 lanes of a warp for small C, a whole block for
// large C), three passes over the row, all in acc_t:
//   1. online max and sum of exp for logits z and target y together (numerically stable softmaxes);
//   2. S_wp = sum_c w_c p_c and the row loss l = sum_c p_c a_c, a_c = -w_c log q_c (log q = (z - max z) - log sum,
//      finite wherever z is);
//   3. grad_logits_j = (q_j S_wp - w_j p_j) / B, grad_target_j = p_j (a_j - l) / B, and the row's sum of
//      squared logit gradients.
// The row loss goes to a workspace and is summed by one block in a fixed order (the loss is deterministic); the
// per-class statistics (summed loss, row count, summed squared gradient) use atomics.
#include "common.cuh"

namespace ltdd_fast {
namespace cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;

template <int G, int NV, typename A>
__device__ __forceinline__ void row_sum(A (&v)[NV], A* smem) {
  if constexpr (G > kWarp) {
    block_allreduce_sum<NV>(v, smem);
  } else {
    group_allreduce_sum_warp<G, NV>(v);
  }
}

template <int G, int NV, typename A>
__device__ __forceinline__ void row_softmax(A (&m)[NV], A (&s)[NV], A* smem) {
  if constexpr (G > kWarp) {
    block_allreduce_softmax<NV>(m, s, smem);
  } else {
    group_allreduce_softmax_warp<G, NV>(m, s);
  }
}

template <typename A>
__device__ __forceinline__ A weight_at(const A* weights, int64_t c) {
  return weights != nullptr ? weights[c] : A(1);
}

template <typename T, int G>
__global__ void __launch_bounds__(kThreads)
    soft_ce_rows_kernel(const T* __restrict__ logits, const T* __restrict__ target,
                        const acc_t<T>* __restrict__ weights, const int64_t* __restrict__ classes, int64_t B,
                        int64_t C, int64_t K, acc_t<T>* __restrict__ row_loss, acc_t<T>* __restrict__ class_loss,
                        acc_t<T>* __restrict__ class_sq, int64_t* __restrict__ class_count,
                        T* __restrict__ grad_logits, T* __restrict__ grad_target) {
  static_assert(G == 8 || G == 16 || G == kWarp || G == kThreads, "a row group is part of a warp or the block");
  using A = acc_t<T>;
  constexpr int kRows = kThreads / G;
  __shared__ A smem[kWarp * 2 * 2];
  const int lane = threadIdx.x % G;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.x / G;
  // groups past the last row still take part in the warp shuffles, over zero columns
  const bool valid = row < B;
  const int64_t cols = valid ? C : 0;
  const int64_t offset = (valid ? row : 0) * C;
  const T* z = logits + offset;
  const T* y = target + offset;
  const A inv_B = A(1) / static_cast<A>(B);

  // pass 1: max and sum of exp of z (index 0) and y (index 1)
  A m[2] = {neg_inf<A>(), neg_inf<A>()};
  A s[2] = {A(0), A(0)};
  for (int64_t c = lane; c < cols; c += G) {
    online_add(m[0], s[0], to_acc(z[c]));
    online_add(m[1], s[1], to_acc(y[c]));
  }
  row_softmax<G, 2>(m, s, smem);
  // log q_c = (z_c - max_z) - log_sum_z: subtracting the max first keeps log q exact to its own scale even when
  // the logits are large (max_z + log_sum_z would round at the logits' magnitude)
  const A max_z = m[0];
  const A log_sum_z = log_(s[0]);
  const A max_y = m[1];
  const A inv_sum_y = A(1) / s[1];

  // pass 2: S_wp and the row loss
  A r[2] = {A(0), A(0)};
  for (int64_t c = lane; c < cols; c += G) {
    const A wp = weight_at(weights, c) * exp_(to_acc(y[c]) - max_y) * inv_sum_y;
    r[0] += wp;
    r[1] -= wp * ((to_acc(z[c]) - max_z) - log_sum_z);
  }
  row_sum<G, 2>(r, smem);
  const A s_wp = r[0];
  const A loss = r[1];

  // pass 3: gradients and their squared norm
  A sq[1] = {A(0)};
  T* gl_row = grad_logits + offset;
  T* gt_row = grad_target + offset;
  for (int64_t c = lane; c < cols; c += G) {
    const A w = weight_at(weights, c);
    const A p = exp_(to_acc(y[c]) - max_y) * inv_sum_y;
    const A log_q = (to_acc(z[c]) - max_z) - log_sum_z;
    const A gl = (exp_(log_q) * s_wp - w * p) * inv_B;
    const A gt = p * (-w * log_q - loss) * inv_B;
    gl_row[c] = from_acc<T>(gl);
    gt_row[c] = from_acc<T>(gt);
    sq[0] += gl * gl;
  }
  row_sum<G, 1>(sq, smem);

  if (valid && lane == 0) {
    row_loss[row] = loss;
    const int64_t k = classes[row];
    LTDD_DEVICE_CHECK(k >= 0 && k < K);
    if (k >= 0 && k < K) {
      atomicAdd(class_loss + k, loss);
      atomicAdd(class_sq + k, sq[0]);
      atomicAdd(reinterpret_cast<unsigned long long*>(class_count + k), 1ull);
    }
  }
}

// one block: loss = sum of row losses / B in a fixed order; class sums and norms cast to T
template <typename T>
__global__ void __launch_bounds__(kThreads)
    soft_ce_finalize_kernel(const acc_t<T>* __restrict__ row_loss, const acc_t<T>* __restrict__ class_loss,
                            const acc_t<T>* __restrict__ class_sq, int64_t B, int64_t K, T* __restrict__ loss,
                            T* __restrict__ class_loss_sum, T* __restrict__ class_grad_norm) {
  using A = acc_t<T>;
  __shared__ A smem[kWarp];
  A acc[1] = {A(0)};
  for (int64_t i = threadIdx.x; i < B; i += blockDim.x) acc[0] += row_loss[i];
  block_allreduce_sum<1>(acc, smem);
  if (threadIdx.x == 0) *loss = from_acc<T>(acc[0] / static_cast<A>(B));
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    class_loss_sum[k] = from_acc<T>(class_loss[k]);
    class_grad_norm[k] = from_acc<T>(sqrt_(class_sq[k]));
  }
}

}  // namespace

int64_t soft_ce_stats_workspace_elems(int64_t B, int64_t K) { return B + 2 * K; }

template <typename T>
cudaError_t soft_ce_stats(const T* logits, const T* target_logits, const acc_t<T>* class_weights,
                          const int64_t* classes, int64_t B, int64_t C, int64_t K, acc_t<T>* workspace, T* loss,
                          T* grad_logits, T* grad_target, T* class_loss_sum, int64_t* class_count,
                          T* class_grad_norm, cudaStream_t stream) {
  using A = acc_t<T>;
  A* row_loss = workspace;
  A* class_loss = workspace + B;
  A* class_sq = workspace + B + K;
  cudaError_t err = cudaMemsetAsync(class_loss, 0, sizeof(A) * 2 * K, stream);
  if (err != cudaSuccess) return err;
  err = cudaMemsetAsync(class_count, 0, sizeof(int64_t) * K, stream);
  if (err != cudaSuccess) return err;
  if (B > 0) {
    if (C <= 64) {
      constexpr int G = 8;
      soft_ce_rows_kernel<T, G><<<static_cast<unsigned>(ceil_div(B, kThreads / G)), kThreads, 0, stream>>>(
          logits, target_logits, class_weights, classes, B, C, K, row_loss, class_loss, class_sq, class_count,
          grad_logits, grad_target);
    } else if (C <= 1024) {
      constexpr int G = kWarp;
      soft_ce_rows_kernel<T, G><<<static_cast<unsigned>(ceil_div(B, kThreads / G)), kThreads, 0, stream>>>(
          logits, target_logits, class_weights, classes, B, C, K, row_loss, class_loss, class_sq, class_count,
          grad_logits, grad_target);
    } else {
      constexpr int G = kThreads;
      soft_ce_rows_kernel<T, G><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(logits, target_logits, class_weights, classes, B, C, K,
                                                            row_loss, class_loss, class_sq, class_count,
                                                            grad_logits, grad_target);
    }
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  soft_ce_finalize_kernel<T><<<1, kThreads, 0, stream>>>(row_loss, class_loss, class_sq, B, K, loss, class_loss_sum,
                                                         class_grad_norm);
  return cudaGetLastError();
}

#define LTDD_INSTANTIATE(T)                                                                                       \
  template cudaError_t soft_ce_stats<T>(const T*, const T*, const acc_t<T>*, const int64_t*, int64_t, int64_t,   \
                                        int64_t, acc_t<T>*, T*, T*, T*, T*, int64_t*, T*, cudaStream_t);
LTDD_FOR_EACH_DTYPE(LTDD_INSTANTIATE)
#undef LTDD_INSTANTIATE

}  // namespace cuda
}  // namespace ltdd_fast
