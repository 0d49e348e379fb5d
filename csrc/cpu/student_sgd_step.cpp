// CPU kernel of ltdd_fast::student_sgd_step: one fused pass over theta, grad and grad_sum.
#include <algorithm>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

namespace {

void check_inputs(const at::Tensor& theta, const at::Tensor& grad, const at::Tensor& grad_sum,
                  const at::Tensor& alpha, int64_t frozen_start, int64_t frozen_end) {
  TORCH_CHECK(theta.dim() == 1, "student_sgd_step: theta must be 1-D, got ", theta.dim(), "-D");
  TORCH_CHECK(grad.sizes() == theta.sizes() && grad_sum.sizes() == theta.sizes(),
              "student_sgd_step: grad and grad_sum must have theta's shape ", theta.sizes());
  TORCH_CHECK(grad.scalar_type() == theta.scalar_type() && grad_sum.scalar_type() == theta.scalar_type(),
              "student_sgd_step: theta, grad and grad_sum must share one dtype");
  TORCH_CHECK(alpha.numel() == 1, "student_sgd_step: alpha must hold one value, got ", alpha.numel());
  TORCH_CHECK(0 <= frozen_start && frozen_start <= frozen_end && frozen_end <= theta.numel(),
              "student_sgd_step: frozen range [", frozen_start, ", ", frozen_end, ") must lie in [0, ",
              theta.numel(), "]");
}

std::tuple<at::Tensor, at::Tensor> student_sgd_step_cpu(const at::Tensor& theta, const at::Tensor& grad,
                                                        const at::Tensor& grad_sum, const at::Tensor& alpha,
                                                        int64_t frozen_start, int64_t frozen_end) {
  check_inputs(theta, grad, grad_sum, alpha, frozen_start, frozen_end);
  auto t = theta.contiguous();
  auto g = grad.contiguous();
  auto s = grad_sum.contiguous();
  auto theta_next = at::empty_like(t);
  auto sum_next = at::empty_like(s);
  const int64_t n = t.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "student_sgd_step_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t a = alpha.item<double>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    scalar_t* to = theta_next.mutable_data_ptr<scalar_t>();
    scalar_t* so = sum_next.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
      // the frozen slice splits [begin, end) into at most three branch-free, vectorisable runs
      const int64_t fs = std::clamp(frozen_start, begin, end), fe = std::clamp(frozen_end, begin, end);
      _Pragma("omp simd")
      for (int64_t i = begin; i < fs; ++i) {
        to[i] = static_cast<scalar_t>(static_cast<opmath_t>(tp[i]) - a * static_cast<opmath_t>(gp[i]));
        so[i] = static_cast<scalar_t>(static_cast<opmath_t>(sp[i]) + static_cast<opmath_t>(gp[i]));
      }
      _Pragma("omp simd")
      for (int64_t i = fs; i < fe; ++i) {
        to[i] = tp[i];
        so[i] = sp[i];
      }
      _Pragma("omp simd")
      for (int64_t i = fe; i < end; ++i) {
        to[i] = static_cast<scalar_t>(static_cast<opmath_t>(tp[i]) - a * static_cast<opmath_t>(gp[i]));
        so[i] = static_cast<scalar_t>(static_cast<opmath_t>(sp[i]) + static_cast<opmath_t>(gp[i]));
      }
    });
  });
  return {theta_next, sum_next};
}

}  // namespace

TORCH_LIBRARY_IMPL(ltdd_fast, CPU, m) {
  m.impl("student_sgd_step", &student_sgd_step_cpu);
}
