// CUDA kernel of ltdd_fast::param_distance. With d = theta_0 - theta_T, e = theta_N - theta_T = d - alpha G and
// m2 the squared mask:
//   D = sum m2 d^2,  loss = sum m2 e^2 / D,  d_alpha = -2 sum m2 G e / D,  v = -2 alpha m2 e / D
// (v = 2 m2 (alpha (theta_T - theta_0) + alpha^2 G) / D rewritten). Three launches, no host sync:
//   1. one pass accumulating the three sums into per-block partials (and, where T is its own accumulation type,
//      writing m2 e into v so that the last pass reads one array instead of three);
//   2. one block combining the partials in a fixed order (deterministic), writing loss, d_alpha and -2 alpha / D;
//   3. v = (-2 alpha / D) m2 e, either scaling what pass 1 wrote or recomputing it from the inputs.
#include <type_traits>

#include "common.cuh"

namespace ltdd_fast {
namespace cuda {
namespace {

using namespace detail;

enum MaskKind { kNoMask = 0, kBoolMask = 1, kValueMask = 2 };

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1024;

// block count of pass 1: a function of n alone, so that the workspace can be sized before the launch
int64_t reduce_blocks(int64_t n) {
  int64_t b = ceil_div(n, kThreads * 4);
  return b < 1 ? 1 : (b > kMaxBlocks ? kMaxBlocks : b);
}

// m2 = squared mask at i (1 without a mask)
template <typename T, int MASK>
__device__ __forceinline__ acc_t<T> mask_sq(const bool* mask_bool, const T* mask_value, int64_t i) {
  using A = acc_t<T>;
  if (MASK == kBoolMask) return mask_bool[i] ? A(1) : A(0);
  if (MASK == kValueMask) {
    const A m = to_acc(mask_value[i]);
    return m * m;
  }
  return A(1);
}

template <typename T, int VEC, int MASK, bool WRITE_W>
__global__ void __launch_bounds__(kThreads)
    param_distance_reduce_kernel(const T* __restrict__ theta_0, const T* __restrict__ theta_T,
                                 const T* __restrict__ grad_sum, const acc_t<T>* __restrict__ alpha,
                                 const bool* __restrict__ mask_bool, const T* __restrict__ mask_value, int64_t n,
                                 acc_t<T>* __restrict__ partials, T* __restrict__ w_out) {
  using A = acc_t<T>;
  __shared__ A smem[kWarp * 3];
  const A a = *alpha;
  A acc[3] = {A(0), A(0), A(0)};  // sum m2 d^2, sum m2 e^2, sum m2 G e
  auto element = [&](T t0, T tT, T gT, int64_t i) -> A {
    const A d = to_acc(t0) - to_acc(tT);
    const A g = to_acc(gT);
    const A e = d - a * g;
    const A m2 = mask_sq<T, MASK>(mask_bool, mask_value, i);
    acc[0] += m2 * d * d;
    acc[1] += m2 * e * e;
    acc[2] += m2 * g * e;
    return m2 * e;
  };
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = n / VEC;
  for (int64_t vi = tid; vi < nvec; vi += stride) {
    const int64_t base = vi * VEC;
    const Vec<T, VEC> t0 = load_vec<T, VEC>(theta_0 + base);
    const Vec<T, VEC> tT = load_vec<T, VEC>(theta_T + base);
    const Vec<T, VEC> g = load_vec<T, VEC>(grad_sum + base);
    if constexpr (WRITE_W) {
      Vec<T, VEC> w;
#pragma unroll
      for (int j = 0; j < VEC; ++j) w.v[j] = from_acc<T>(element(t0.v[j], tT.v[j], g.v[j], base + j));
      store_vec(w_out + base, w);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) element(t0.v[j], tT.v[j], g.v[j], base + j);
    }
  }
  for (int64_t i = nvec * VEC + tid; i < n; i += stride) {
    const A w = element(theta_0[i], theta_T[i], grad_sum[i], i);
    if constexpr (WRITE_W) w_out[i] = from_acc<T>(w);
  }
  block_allreduce_sum<3>(acc, smem);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int j = 0; j < 3; ++j) partials[j * gridDim.x + blockIdx.x] = acc[j];
  }
}

// one block: combine the partials, write loss and d_alpha, leave coef = -2 alpha / D in the workspace
template <typename T>
__global__ void __launch_bounds__(kThreads)
    param_distance_finalize_kernel(const acc_t<T>* __restrict__ partials, int nblocks,
                                   const acc_t<T>* __restrict__ alpha, acc_t<T>* __restrict__ coef,
                                   T* __restrict__ loss, T* __restrict__ d_alpha) {
  using A = acc_t<T>;
  __shared__ A smem[kWarp * 3];
  A acc[3] = {A(0), A(0), A(0)};
  for (int b = threadIdx.x; b < nblocks; b += blockDim.x) {
#pragma unroll
    for (int j = 0; j < 3; ++j) acc[j] += partials[j * nblocks + b];
  }
  block_allreduce_sum<3>(acc, smem);
  if (threadIdx.x == 0) {
    const A D = acc[0];
    *loss = from_acc<T>(acc[1] / D);
    *d_alpha = from_acc<T>(A(-2) * acc[2] / D);
    *coef = A(-2) * (*alpha) / D;
  }
}

// v *= coef, in place (v holds m2 e from pass 1)
template <typename T, int VEC>
__global__ void param_distance_scale_kernel(T* __restrict__ v, const acc_t<T>* __restrict__ coef, int64_t n) {
  const acc_t<T> c = *coef;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = n / VEC;
  for (int64_t vi = tid; vi < nvec; vi += stride) {
    Vec<T, VEC> x = load_vec<T, VEC>(v + vi * VEC);
#pragma unroll
    for (int j = 0; j < VEC; ++j) x.v[j] = from_acc<T>(to_acc(x.v[j]) * c);
    store_vec(v + vi * VEC, x);
  }
  for (int64_t i = nvec * VEC + tid; i < n; i += stride) v[i] = from_acc<T>(to_acc(v[i]) * c);
}

// v = coef m2 e from the inputs (low precision types, where storing m2 e in T first would round twice)
template <typename T, int VEC, int MASK>
__global__ void param_distance_v_kernel(const T* __restrict__ theta_0, const T* __restrict__ theta_T,
                                        const T* __restrict__ grad_sum, const acc_t<T>* __restrict__ alpha,
                                        const bool* __restrict__ mask_bool, const T* __restrict__ mask_value,
                                        const acc_t<T>* __restrict__ coef, int64_t n, T* __restrict__ v) {
  using A = acc_t<T>;
  const A a = *alpha;
  const A c = *coef;
  auto element = [&](T t0, T tT, T g, int64_t i) -> T {
    const A e = (to_acc(t0) - to_acc(tT)) - a * to_acc(g);
    return from_acc<T>(c * mask_sq<T, MASK>(mask_bool, mask_value, i) * e);
  };
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = n / VEC;
  for (int64_t vi = tid; vi < nvec; vi += stride) {
    const int64_t base = vi * VEC;
    const Vec<T, VEC> t0 = load_vec<T, VEC>(theta_0 + base);
    const Vec<T, VEC> tT = load_vec<T, VEC>(theta_T + base);
    const Vec<T, VEC> g = load_vec<T, VEC>(grad_sum + base);
    Vec<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) out.v[j] = element(t0.v[j], tT.v[j], g.v[j], base + j);
    store_vec(v + base, out);
  }
  for (int64_t i = nvec * VEC + tid; i < n; i += stride) v[i] = element(theta_0[i], theta_T[i], grad_sum[i], i);
}

template <typename T, int VEC, int MASK>
void launch_all(const T* theta_0, const T* theta_T, const T* grad_sum, const acc_t<T>* alpha, const bool* mask_bool,
                const T* mask_value, int64_t n, acc_t<T>* workspace, T* loss, T* v, T* d_alpha,
                cudaStream_t stream) {
  constexpr bool kWriteW = std::is_same<T, acc_t<T>>::value;
  const int nblocks = static_cast<int>(reduce_blocks(n));
  acc_t<T>* partials = workspace;
  acc_t<T>* coef = workspace + 3 * nblocks;
  param_distance_reduce_kernel<T, VEC, MASK, kWriteW><<<nblocks, kThreads, 0, stream>>>(
      theta_0, theta_T, grad_sum, alpha, mask_bool, mask_value, n, partials, v);
  param_distance_finalize_kernel<T><<<1, kThreads, 0, stream>>>(partials, nblocks, alpha, coef, loss, d_alpha);
  if (n == 0) return;
  const unsigned blocks = grid_for(ceil_div(n, VEC), kThreads, 8192);
  if constexpr (kWriteW) {
    param_distance_scale_kernel<T, VEC><<<blocks, kThreads, 0, stream>>>(v, coef, n);
  } else {
    param_distance_v_kernel<T, VEC, MASK><<<blocks, kThreads, 0, stream>>>(theta_0, theta_T, grad_sum, alpha,
                                                                           mask_bool, mask_value, coef, n, v);
  }
}

template <typename T, int VEC>
void launch_masked(const T* theta_0, const T* theta_T, const T* grad_sum, const acc_t<T>* alpha,
                   const bool* mask_bool, const T* mask_value, int64_t n, acc_t<T>* workspace, T* loss, T* v,
                   T* d_alpha, cudaStream_t stream) {
  if (mask_bool != nullptr) {
    launch_all<T, VEC, kBoolMask>(theta_0, theta_T, grad_sum, alpha, mask_bool, mask_value, n, workspace, loss, v,
                                  d_alpha, stream);
  } else if (mask_value != nullptr) {
    launch_all<T, VEC, kValueMask>(theta_0, theta_T, grad_sum, alpha, mask_bool, mask_value, n, workspace, loss, v,
                                   d_alpha, stream);
  } else {
    launch_all<T, VEC, kNoMask>(theta_0, theta_T, grad_sum, alpha, mask_bool, mask_value, n, workspace, loss, v,
                                d_alpha, stream);
  }
}

}  // namespace

int64_t param_distance_workspace_elems(int64_t n) { return 3 * reduce_blocks(n) + 1; }

template <typename T>
cudaError_t param_distance(const T* theta_0, const T* theta_T, const T* grad_sum, const acc_t<T>* alpha,
                           const bool* mask_bool, const T* mask_value, int64_t n, acc_t<T>* workspace, T* loss,
                           T* v, T* d_alpha, cudaStream_t stream) {
  // the value mask is read element by element (as is the bool one), so it does not take part in the alignment
  const bool vec = aligned16(theta_0) && aligned16(theta_T) && aligned16(grad_sum) && aligned16(v);
  if (vec) {
    launch_masked<T, vec_width<T>()>(theta_0, theta_T, grad_sum, alpha, mask_bool, mask_value, n, workspace, loss, v,
                                     d_alpha, stream);
  } else {
    launch_masked<T, 1>(theta_0, theta_T, grad_sum, alpha, mask_bool, mask_value, n, workspace, loss, v, d_alpha,
                        stream);
  }
  return cudaGetLastError();
}

#define LTDD_INSTANTIATE(T)                                                                                         \
  template cudaError_t param_distance<T>(const T*, const T*, const T*, const acc_t<T>*, const bool*, const T*,     \
                                         int64_t, acc_t<T>*, T*, T*, T*, cudaStream_t);
LTDD_FOR_EACH_DTYPE(LTDD_INSTANTIATE)
#undef LTDD_INSTANTIATE

}  // namespace cuda
}  // namespace ltdd_fast
