// CUDA kernels of ltdd_fast::dsa: the whole DSA chain of one call, or its transpose, in one launch, one block
// per image. The arithmetic is csrc/dsa_chain.h's, one thread per output pixel at a time:
// - forward: a block-wide sum first where contrast needs the image's mean, then each output pixel's <= 16 taps
//   of the colour-adjusted image, computed from the input as they are read (no intermediate image);
// - transpose: the output gradient scattered through the same taps into a zeroed workspace of the accumulation
//   type (atomics: bilinear taps of neighbouring pixels overlap), then, after a block barrier, the colour
//   transpose, which needs the image's sum and each pixel's channel sum, written out in the dtype.
// flags and values are read on the device, so the launch never waits for the host and one CUDA graph serves
// every family of DSA.
#include "common.cuh"
#include "../dsa_chain.h"

namespace ltdd_fast {
namespace cuda {
namespace {

using namespace detail;
using dsa::Chain;
using dsa::kMaxTaps;
using dsa::kNumColumns;
using dsa::kNumOps;

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ Chain<acc_t<T>> image_chain(const T* values, const int32_t* flags, int64_t b, int64_t H,
                                                       int64_t W, int64_t cutout_h, int64_t cutout_w) {
  using A = acc_t<T>;
  A v[kNumColumns];
#pragma unroll
  for (int k = 0; k < kNumColumns; ++k) v[k] = to_acc(values[b * kNumColumns + k]);
  int32_t f[kNumOps];
#pragma unroll
  for (int k = 0; k < kNumOps; ++k) f[k] = flags[k];
  return Chain<A>(f, v, H, W, cutout_h, cutout_w);
}

// the brightened channel mean of pixel q (saturation's centre)
template <typename T>
__device__ __forceinline__ acc_t<T> pixel_mean(const Chain<acc_t<T>>& ch, const T* x, int64_t q, int64_t C,
                                               int64_t HW) {
  acc_t<T> m = 0;
  for (int64_t c = 0; c < C; ++c) m += to_acc(x[c * HW + q]);
  return m / static_cast<acc_t<T>>(C) + ch.add;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    dsa_forward_kernel(const T* __restrict__ x, const T* __restrict__ values, const int32_t* __restrict__ flags,
                       int64_t C, int64_t H, int64_t W, int64_t cutout_h, int64_t cutout_w, T* __restrict__ out) {
  using A = acc_t<T>;
  __shared__ A smem[kWarp];
  const int64_t b = blockIdx.x, HW = H * W;
  const Chain<A> ch = image_chain(values, flags, b, H, W, cutout_h, cutout_w);
  const T* xb = x + b * C * HW;
  T* ob = out + b * C * HW;
  A mean = 0;  // contrast's centre: the mean of the brightened, saturated image
  if (ch.con) {
    A s[1] = {A(0)};
    for (int64_t q = threadIdx.x; q < HW; q += blockDim.x) {
      const A m = ch.sat ? pixel_mean(ch, xb, q, C, HW) : A(0);
      for (int64_t c = 0; c < C; ++c) {
        A y = to_acc(xb[c * HW + q]) + ch.add;
        s[0] += ch.sat ? (y - m) * ch.sat_f + m : y;
      }
    }
    block_allreduce_sum<1>(s, smem);
    mean = s[0] / static_cast<A>(C * HW);
  }
  int64_t q[kMaxTaps];
  A w[kMaxTaps], m[kMaxTaps];
  for (int64_t p = threadIdx.x; p < HW; p += blockDim.x) {
    int n = 1;
    q[0] = p;
    w[0] = A(1);
    if (ch.spatial()) n = ch.taps(p / W, p % W, q, w);
    for (int t = 0; t < n; ++t) m[t] = ch.sat ? pixel_mean(ch, xb, q[t], C, HW) : A(0);
    for (int64_t c = 0; c < C; ++c) {
      const T* xc = xb + c * HW;
      A s = 0;
      for (int t = 0; t < n; ++t) s += w[t] * ch.colour_forward(to_acc(xc[q[t]]), m[t], mean);
      ob[c * HW + p] = from_acc<T>(s);
    }
  }
}

template <typename A>
__device__ __forceinline__ A load_l2(const A* p) {
  return __ldcg(p);  // the workspace was written by other threads' atomics, which live in L2, not in this L1
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    dsa_transpose_kernel(const T* __restrict__ g, const T* __restrict__ values, const int32_t* __restrict__ flags,
                         int64_t C, int64_t H, int64_t W, int64_t cutout_h, int64_t cutout_w,
                         acc_t<T>* __restrict__ workspace, T* __restrict__ out) {
  using A = acc_t<T>;
  __shared__ A smem[kWarp];
  const int64_t b = blockIdx.x, HW = H * W, n_img = C * HW;
  const Chain<A> ch = image_chain(values, flags, b, H, W, cutout_h, cutout_w);
  const T* gb = g + b * n_img;
  A* wb = workspace + b * n_img;
  T* ob = out + b * n_img;
  const bool spatial = ch.spatial();
  if (spatial) {
    for (int64_t e = threadIdx.x; e < n_img; e += blockDim.x) wb[e] = A(0);
    __syncthreads();
    int64_t q[kMaxTaps];
    A w[kMaxTaps];
    for (int64_t p = threadIdx.x; p < HW; p += blockDim.x) {
      const int n = ch.taps(p / W, p % W, q, w);
      for (int64_t c = 0; c < C; ++c) {
        const A gv = to_acc(gb[c * HW + p]);
        for (int t = 0; t < n; ++t) atomic_add(wb + c * HW + q[t], w[t] * gv);
      }
    }
    __syncthreads();
  }
  // the gradient at the colour stage's output: the workspace, or g itself where no op moves pixels
  auto read = [&](int64_t e) -> A { return spatial ? load_l2(wb + e) : to_acc(gb[e]); };
  if (!(ch.con || ch.sat)) {
    for (int64_t e = threadIdx.x; e < n_img; e += blockDim.x) ob[e] = from_acc<T>(read(e));
    return;
  }
  A total[1] = {A(0)};
  if (ch.con) {
    for (int64_t e = threadIdx.x; e < n_img; e += blockDim.x) total[0] += read(e);
    block_allreduce_sum<1>(total, smem);
  }
  const A k = ch.contrast_k(total[0], n_img);
  for (int64_t p = threadIdx.x; p < HW; p += blockDim.x) {
    A sum = 0;
    for (int64_t c = 0; c < C; ++c) sum += read(c * HW + p);
    for (int64_t c = 0; c < C; ++c) ob[c * HW + p] = from_acc<T>(ch.colour_transpose(read(c * HW + p), sum, C, k));
  }
}

}  // namespace

int64_t dsa_workspace_elems(int64_t B, int64_t C, int64_t H, int64_t W, bool transpose) {
  return transpose ? B * C * H * W : 0;
}

template <typename T>
cudaError_t dsa(const T* x, const T* values, const int32_t* flags, int64_t B, int64_t C, int64_t H, int64_t W,
                int64_t cutout_h, int64_t cutout_w, bool transpose, acc_t<T>* workspace, T* out,
                cudaStream_t stream) {
  if (B <= 0 || C <= 0 || H <= 0 || W <= 0) return cudaSuccess;
  if (transpose)
    dsa_transpose_kernel<T><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(x, values, flags, C, H, W, cutout_h,
                                                                               cutout_w, workspace, out);
  else
    dsa_forward_kernel<T><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(x, values, flags, C, H, W, cutout_h,
                                                                             cutout_w, out);
  return cudaGetLastError();
}

#define LTDD_INSTANTIATE(T)                                                                                         \
  template cudaError_t dsa<T>(const T*, const T*, const int32_t*, int64_t, int64_t, int64_t, int64_t, int64_t,     \
                              int64_t, bool, acc_t<T>*, T*, cudaStream_t);
LTDD_FOR_EACH_DTYPE(LTDD_INSTANTIATE)
#undef LTDD_INSTANTIATE

}  // namespace cuda
}  // namespace ltdd_fast
