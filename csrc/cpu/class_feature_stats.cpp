// CPU kernel of ltdd_fast::class_feature_stats: per-class count, sum and sum of squares of features [N, C, P]
// (P the product of the spatial sizes) per channel, in the op's math type (float for float, half and bfloat16;
// double for double). Channels are split over threads; each thread sweeps the images in order and adds each
// image's plane sums into its channels' class rows, so every (class, channel) adds its images' planes in image
// order and each plane is summed by the same code whatever the split: the results are independent of the thread
// count, and no thread writes another's channels (no atomics).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cmath>
#include <tuple>
#include <vector>

namespace {

// a * b + c fused where the target has FMA, and spelled out so that the vectorised and the scalar copies of a loop
// round alike (which elements a thread's vector body takes depends on its channel range)
inline float madd(float a, float b, float c) {
#if defined(__FMA__) || defined(__aarch64__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}
inline double madd(double a, double b, double c) {
#if defined(__FMA__) || defined(__aarch64__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// (sum, sum of squares) of one plane of P values, in opmath_t. Long planes run over K lane accumulators (one
// accumulator would be bound by the add latency) combined in a fixed order; short ones run in order.
template <typename scalar_t, typename opmath_t>
inline void plane_sums(const scalar_t* p, int64_t P, opmath_t& sum, opmath_t& sumsq) {
  constexpr int64_t K = 128 / sizeof(opmath_t);
  opmath_t s = 0, q = 0;
  if (P < 2 * K) {
    for (int64_t j = 0; j < P; ++j) {
      const opmath_t x = static_cast<opmath_t>(p[j]);
      s += x;
      q = madd(x, x, q);
    }
  } else {
    opmath_t as[K] = {}, aq[K] = {};
    int64_t j = 0;
    for (; j + K <= P; j += K) {
      _Pragma("omp simd")
      for (int64_t k = 0; k < K; ++k) {
        const opmath_t x = static_cast<opmath_t>(p[j + k]);
        as[k] += x;
        aq[k] = madd(x, x, aq[k]);
      }
    }
    for (int64_t k = 0; j < P; ++j, ++k) {
      const opmath_t x = static_cast<opmath_t>(p[j]);
      as[k] += x;
      aq[k] = madd(x, x, aq[k]);
    }
    for (int64_t k = 0; k < K; ++k) {
      s += as[k];
      q += aq[k];
    }
  }
  sum = s;
  sumsq = q;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> class_feature_stats_cpu(const at::Tensor& features,
                                                                       const at::Tensor& classes,
                                                                       int64_t num_classes) {
  TORCH_CHECK(features.dim() >= 2, "class_feature_stats: features must be [N, C, ...], got ", features.dim(),
              "-D");
  TORCH_CHECK(features.is_floating_point(), "class_feature_stats: features must be floating point, got ",
              features.scalar_type());
  TORCH_CHECK(classes.dim() == 1 && classes.size(0) == features.size(0) && classes.scalar_type() == at::kLong,
              "class_feature_stats: classes must be int64 [", features.size(0), "], got ", classes.scalar_type(), " ",
              classes.sizes());
  TORCH_CHECK(num_classes > 0, "class_feature_stats: num_classes must be positive, got ", num_classes);
  const at::Tensor x = features.contiguous();
  const at::Tensor cls = classes.contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  int64_t P = 1;  // positions per plane (not numel / (N C), which N = 0 or C = 0 would break)
  for (int64_t d = 2; d < x.dim(); ++d) P *= x.size(d);
  const int64_t* cp = cls.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i)
    TORCH_CHECK(cp[i] >= 0 && cp[i] < num_classes, "class_feature_stats: classes[", i, "] = ", cp[i],
                " is outside [0, ", num_classes, ")");
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor count = at::zeros({num_classes}, x.options().dtype(acc));
  at::Tensor sum = at::zeros({num_classes, C}, x.options().dtype(acc));
  at::Tensor sumsq = at::zeros({num_classes, C}, x.options().dtype(acc));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "class_feature_stats_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;  // the type of the outputs (acc above)
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    opmath_t* sp = sum.mutable_data_ptr<opmath_t>();
    opmath_t* qp = sumsq.mutable_data_ptr<opmath_t>();
    const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(N * P, 1));
    at::parallel_for(0, C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t n = 0; n < N; ++n) {
        const scalar_t* image = xp + n * C * P;
        opmath_t* srow = sp + cp[n] * C;
        opmath_t* qrow = qp + cp[n] * C;
        if (P == 1) {  // [N, C] features: the channels of an image are contiguous, one vector loop over them
          _Pragma("omp simd")
          for (int64_t ch = begin; ch < end; ++ch) {
            const opmath_t v = static_cast<opmath_t>(image[ch]);
            srow[ch] += v;
            qrow[ch] = madd(v, v, qrow[ch]);
          }
        } else {
          for (int64_t ch = begin; ch < end; ++ch) {
            opmath_t s, q;
            plane_sums<scalar_t, opmath_t>(image + ch * P, P, s, q);
            srow[ch] += s;
            qrow[ch] += q;
          }
        }
      }
    });
    std::vector<int64_t> images(num_classes, 0);
    for (int64_t i = 0; i < N; ++i) ++images[cp[i]];
    opmath_t* np = count.mutable_data_ptr<opmath_t>();
    for (int64_t k = 0; k < num_classes; ++k) np[k] = static_cast<opmath_t>(images[k] * P);
  });
  return {count, sum, sumsq};
}

}  // namespace

TORCH_LIBRARY_IMPL(ltdd_fast, CPU, m) {
  m.impl("class_feature_stats", &class_feature_stats_cpu);
}
