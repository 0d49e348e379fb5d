// CPU kernel of ltdd_fast::student_sgd_step: one fused pass over theta, grad and grad_sum.
#include <algorithm>
#include <cstring>
#include <utility>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "large_output.h"

namespace {

// Elements per parallel task. The loop moves ~20 bytes per element at tens of GB/s, so a small vector is done
// before a parallel region's fork/join pays off: on 2 cores one thread was faster at 70k elements, two at 140k.
constexpr int64_t kGrain = 1 << 17;

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

// theta_next = theta - a g and sum_next = grad_sum + g on [begin, end): one vectorised pass. The outputs are
// fresh tensors, so __restrict holds and the compiler needs no runtime overlap checks.
template <typename scalar_t, typename opmath_t>
inline void step_run(const scalar_t* __restrict tp, const scalar_t* __restrict gp, const scalar_t* __restrict sp,
                     scalar_t* __restrict to, scalar_t* __restrict so, opmath_t a, int64_t begin, int64_t end) {
  _Pragma("omp simd")
  for (int64_t i = begin; i < end; ++i) {
    const opmath_t g = static_cast<opmath_t>(gp[i]);
    // GCC may contract this into one FMA (the reference rounds a * g first): at most 1 ulp apart
    to[i] = static_cast<scalar_t>(static_cast<opmath_t>(tp[i]) - a * g);
    so[i] = static_cast<scalar_t>(static_cast<opmath_t>(sp[i]) + g);
  }
}

std::tuple<at::Tensor, at::Tensor> student_sgd_step_cpu(const at::Tensor& theta, const at::Tensor& grad,
                                                        const at::Tensor& grad_sum, const at::Tensor& alpha,
                                                        int64_t frozen_start, int64_t frozen_end) {
  check_inputs(theta, grad, grad_sum, alpha, frozen_start, frozen_end);
  auto t = theta.contiguous();
  auto g = grad.contiguous();
  auto s = grad_sum.contiguous();
  auto theta_next = ltdd_fast::empty_output(t);
  auto sum_next = ltdd_fast::empty_output(s);
  const int64_t n = t.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "student_sgd_step_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t a = alpha.item<double>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    scalar_t* to = theta_next.mutable_data_ptr<scalar_t>();
    scalar_t* so = sum_next.mutable_data_ptr<scalar_t>();
    // The frozen slice splits [0, n) into a step, a plain copy (g' = 0 there) and a step. Task k of `tasks`
    // takes the k-th share of each of the three runs, so tasks stay balanced however large the frozen slice (a
    // copy moves 16 bytes an element, a step 20); the shares tile each run exactly.
    const int64_t tasks = std::min<int64_t>(at::get_num_threads(), (n + kGrain - 1) / kGrain);
    at::parallel_for(0, tasks, 1, [&](int64_t task_begin, int64_t task_end) {
      for (int64_t k = task_begin; k < task_end; ++k) {
        auto share = [&](int64_t lo, int64_t hi) {
          return std::pair<int64_t, int64_t>{lo + (hi - lo) * k / tasks, lo + (hi - lo) * (k + 1) / tasks};
        };
        const auto [b0, e0] = share(0, frozen_start);
        const auto [b1, e1] = share(frozen_start, frozen_end);
        const auto [b2, e2] = share(frozen_end, n);
        step_run(tp, gp, sp, to, so, a, b0, e0);
        if (e1 > b1) {
          std::memcpy(to + b1, tp + b1, (e1 - b1) * sizeof(scalar_t));
          std::memcpy(so + b1, sp + b1, (e1 - b1) * sizeof(scalar_t));
        }
        step_run(tp, gp, sp, to, so, a, b2, e2);
      }
    });
  });
  return {theta_next, sum_next};
}

}  // namespace

TORCH_LIBRARY_IMPL(ltdd_fast, CPU, m) {
  m.impl("student_sgd_step", &student_sgd_step_cpu);
}
