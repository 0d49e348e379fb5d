// CPU kernel of ltdd_fast::class_grad_stats: per-image gradient L2 norms, summed and maxed per class. Image norms
// are computed in parallel, then combined per class in image order (independent of the thread count).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cmath>
#include <vector>

namespace {

std::tuple<at::Tensor, at::Tensor> class_grad_stats_cpu(const at::Tensor& grads, const at::Tensor& classes,
                                                        int64_t num_classes) {
  TORCH_CHECK(grads.dim() >= 1, "class_grad_stats: grads must be [N, ...], got a 0-d tensor");
  TORCH_CHECK(grads.is_floating_point(), "class_grad_stats: grads must be floating point, got ",
              grads.scalar_type());
  TORCH_CHECK(classes.dim() == 1 && classes.size(0) == grads.size(0) && classes.scalar_type() == at::kLong,
              "class_grad_stats: classes must be int64 [", grads.size(0), "], got ", classes.scalar_type(), " ",
              classes.sizes());
  TORCH_CHECK(num_classes > 0, "class_grad_stats: num_classes must be positive, got ", num_classes);
  auto g = grads.contiguous();
  auto cls = classes.contiguous();
  const int64_t n = g.size(0);
  const int64_t row = n > 0 ? g.numel() / n : 0;
  const int64_t* cp = cls.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(cp[i] >= 0 && cp[i] < num_classes, "class_grad_stats: classes[", i, "] = ", cp[i],
                " is outside [0, ", num_classes, ")");
  auto norm_sum = at::zeros({num_classes}, g.options());
  auto norm_max = at::zeros({num_classes}, g.options());
  std::vector<double> norms(n);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "class_grad_stats_cpu", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    // Each row's squares are summed in the op's math type across vector lanes (omp simd): a serial double sum
    // would be bound by the add latency, several times slower than the memory traffic.
    using opmath_t = at::opmath_type<scalar_t>;
    const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(row, 1));
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* r = gp + i * row;
        // K independent accumulators (K / lanes vector registers): one accumulator would be bound by the add
        // latency, several times slower than the memory traffic. Combined in a fixed order.
        constexpr int64_t K = 128 / sizeof(opmath_t);
        opmath_t acc[K] = {};
        int64_t j = 0;
        for (; j + K <= row; j += K) {
          _Pragma("omp simd")
          for (int64_t k = 0; k < K; ++k) {
            const opmath_t x = static_cast<opmath_t>(r[j + k]);
            acc[k] += x * x;
          }
        }
        for (int64_t k = 0; j < row; ++j, ++k) {
          const opmath_t x = static_cast<opmath_t>(r[j]);
          acc[k] += x * x;
        }
        opmath_t s = 0;
        for (int64_t k = 0; k < K; ++k) s += acc[k];
        norms[i] = std::sqrt(static_cast<double>(s));
      }
    });
    std::vector<double> sum(num_classes, 0.0), mx(num_classes, 0.0);  // norms are >= 0: 0 suits an empty class
    for (int64_t i = 0; i < n; ++i) {
      sum[cp[i]] += norms[i];
      mx[cp[i]] = std::max(mx[cp[i]], norms[i]);
    }
    scalar_t* sp = norm_sum.mutable_data_ptr<scalar_t>();
    scalar_t* mp = norm_max.mutable_data_ptr<scalar_t>();
    for (int64_t k = 0; k < num_classes; ++k) {
      sp[k] = static_cast<scalar_t>(sum[k]);
      mp[k] = static_cast<scalar_t>(mx[k]);
    }
  });
  return {norm_sum, norm_max};
}

}  // namespace

TORCH_LIBRARY_IMPL(ltdd_fast, CPU, m) {
  m.impl("class_grad_stats", &class_grad_stats_cpu);
}
