// CUDA kernel of ltdd_fast::class_feature_stats: per-class count, sum and sum of squares of features [N, C, P] per
// channel, deterministic (no atomics):
//   1. plane sums: groups of G lanes of a warp (G a power of two, up to 32, matched to the plane's length) each sum
//      one (image, channel) plane of P values and its squares, lane-strided (vectorised loads where planes are
//      16-byte aligned) and reduced by a fixed butterfly, into a workspace [N, C] of each;
//   2. class sums: one thread per (class, channel) sweeps the images in order and adds the planes of its class's
//      images (a warp covers consecutive channels of one class, so the test of an image's class is uniform across
//      it and the plane sums it reads are coalesced); the thread of channel 0 also counts the class's images.
// Every output is written by one thread in a fixed order, so the results are bit-identical from run to run. Step 2
// reads the N classes once per warp: K C N / 32 tests, small next to step 1's N C P values at the sizes of a batch's
// statistics (10 classes, 128 channels, 256 images: 10k tests a warp-wide against 8M values).
#include "common.cuh"

namespace ltdd_fast {
namespace cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;

template <typename T, int G, int VEC>
__global__ void __launch_bounds__(kThreads)
    plane_sums_kernel(const T* __restrict__ features, int64_t planes, int64_t P, acc_t<T>* __restrict__ plane_sum,
                      acc_t<T>* __restrict__ plane_sumsq) {
  using A = acc_t<T>;
  constexpr int kPerWarp = kWarp / G;  // planes a warp takes at once
  const int lane = threadIdx.x % kWarp;
  const int sub = lane % G;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  // the bound is uniform across the warp: every lane stays in the loop for the shuffles
  for (int64_t base = warp * kPerWarp; base < planes; base += warps * kPerWarp) {
    const int64_t plane = base + lane / G;
    A v[2] = {A(0), A(0)};
    if (plane < planes) {
      const T* p = features + plane * P;
      // with VEC > 1, P is a multiple of VEC and each plane starts aligned
      for (int64_t i = static_cast<int64_t>(sub) * VEC; i < P; i += static_cast<int64_t>(G) * VEC) {
        const Vec<T, VEC> x = load_vec<T, VEC>(p + i);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const A a = to_acc(x.v[j]);
          v[0] += a;
          v[1] += a * a;
        }
      }
    }
    group_allreduce_sum_warp<G, 2>(v);
    if (plane < planes && sub == 0) {
      plane_sum[plane] = v[0];
      plane_sumsq[plane] = v[1];
    }
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    class_sums_kernel(const A* __restrict__ plane_sum, const A* __restrict__ plane_sumsq,
                      const int64_t* __restrict__ classes, int64_t N, int64_t C, int64_t P, int64_t K,
                      A* __restrict__ count, A* __restrict__ sum, A* __restrict__ sumsq) {
  const int64_t width = C > 0 ? C : 1;  // C = 0: one thread per class still writes its count
  const int64_t items = K * width;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < items; t += stride) {
    const int64_t k = t / width, ch = t % width;
    const bool channel = ch < C;
    A s = A(0), q = A(0);
    int64_t images = 0;
    for (int64_t n = 0; n < N; ++n) {
      const int64_t c = classes[n];
      LTDD_DEVICE_CHECK(c >= 0 && c < K);  // a class outside [0, K) matches no thread: left out
      if (c == k) {
        ++images;
        if (channel) {
          s += plane_sum[n * C + ch];
          q += plane_sumsq[n * C + ch];
        }
      }
    }
    if (channel) {
      sum[k * C + ch] = s;
      sumsq[k * C + ch] = q;
    }
    if (ch == 0) count[k] = static_cast<A>(images * P);
  }
}

template <typename T, int VEC>
void launch_plane_sums(const T* features, int64_t planes, int64_t P, int G, acc_t<T>* plane_sum,
                       acc_t<T>* plane_sumsq, cudaStream_t stream) {
  // blocks of kThreads / G planes, at most ~64k blocks (the loop strides over the rest)
  const unsigned blocks = grid_for(planes * G, kThreads, 65536);
  switch (G) {
    case 1:
      plane_sums_kernel<T, 1, VEC><<<blocks, kThreads, 0, stream>>>(features, planes, P, plane_sum, plane_sumsq);
      break;
    case 2:
      plane_sums_kernel<T, 2, VEC><<<blocks, kThreads, 0, stream>>>(features, planes, P, plane_sum, plane_sumsq);
      break;
    case 4:
      plane_sums_kernel<T, 4, VEC><<<blocks, kThreads, 0, stream>>>(features, planes, P, plane_sum, plane_sumsq);
      break;
    case 8:
      plane_sums_kernel<T, 8, VEC><<<blocks, kThreads, 0, stream>>>(features, planes, P, plane_sum, plane_sumsq);
      break;
    case 16:
      plane_sums_kernel<T, 16, VEC><<<blocks, kThreads, 0, stream>>>(features, planes, P, plane_sum, plane_sumsq);
      break;
    default:
      plane_sums_kernel<T, 32, VEC><<<blocks, kThreads, 0, stream>>>(features, planes, P, plane_sum, plane_sumsq);
      break;
  }
}

// lanes per plane: enough for a plane's loads (of VEC values each), a power of two up to a warp
int lanes_for(int64_t P, int vec) {
  const int64_t loads = ceil_div(P, vec);
  int g = 1;
  while (g < kWarp && g < loads) g *= 2;
  return g;
}

}  // namespace

int64_t class_feature_stats_workspace_elems(int64_t N, int64_t C) { return 2 * (N > 0 ? N : 0) * (C > 0 ? C : 0); }

template <typename T>
cudaError_t class_feature_stats(const T* features, const int64_t* classes, int64_t N, int64_t C, int64_t P,
                                int64_t K, acc_t<T>* workspace, acc_t<T>* count, acc_t<T>* sum, acc_t<T>* sumsq,
                                cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t planes = (N > 0 ? N : 0) * (C > 0 ? C : 0);
  A* plane_sum = workspace;
  A* plane_sumsq = workspace + planes;
  if (planes > 0) {
    constexpr int kVec = vec_width<T>();
    if (aligned16(features) && P % kVec == 0) {
      launch_plane_sums<T, kVec>(features, planes, P, lanes_for(P, kVec), plane_sum, plane_sumsq, stream);
    } else {
      launch_plane_sums<T, 1>(features, planes, P, lanes_for(P, 1), plane_sum, plane_sumsq, stream);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (K > 0) {
    const int64_t items = K * (C > 0 ? C : 1);
    class_sums_kernel<A><<<grid_for(items, kThreads, 65536), kThreads, 0, stream>>>(
        plane_sum, plane_sumsq, classes, N > 0 ? N : 0, C, P, K, count, sum, sumsq);
  }
  return cudaGetLastError();
}

#define LTDD_INSTANTIATE(T)                                                                                      \
  template cudaError_t class_feature_stats<T>(const T*, const int64_t*, int64_t, int64_t, int64_t, int64_t,    \
                                              acc_t<T>*, acc_t<T>*, acc_t<T>*, acc_t<T>*, cudaStream_t);
LTDD_FOR_EACH_DTYPE(LTDD_INSTANTIATE)
#undef LTDD_INSTANTIATE

}  // namespace cuda
}  // namespace ltdd_fast
