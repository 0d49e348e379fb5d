// CPU kernel of ltdd_fast::param_distance: the normalised parameter distance, its gradient v w.r.t. grad_sum and
// d loss / d alpha. One reduction pass for the three sums, one pass writing v (v needs the denominator D).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <array>
#include <type_traits>
#include <vector>

namespace {

// Fixed chunks, combined in order: the sums do not depend on the thread count.
constexpr int64_t kChunk = 1 << 14;

void check_inputs(const at::Tensor& theta_0, const at::Tensor& theta_T, const at::Tensor& grad_sum,
                  const at::Tensor& alpha, const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(theta_0.dim() == 1, "param_distance: theta_0 must be 1-D, got ", theta_0.dim(), "-D");
  TORCH_CHECK(theta_0.is_floating_point(), "param_distance: theta_0 must be floating point, got ",
              theta_0.scalar_type());
  TORCH_CHECK(theta_T.sizes() == theta_0.sizes() && grad_sum.sizes() == theta_0.sizes(),
              "param_distance: theta_T and grad_sum must have theta_0's shape ", theta_0.sizes());
  TORCH_CHECK(theta_T.scalar_type() == theta_0.scalar_type() && grad_sum.scalar_type() == theta_0.scalar_type(),
              "param_distance: theta_0, theta_T and grad_sum must share one dtype");
  TORCH_CHECK(alpha.numel() == 1, "param_distance: alpha must hold one value, got ", alpha.numel());
  if (mask.has_value()) {
    TORCH_CHECK(mask->sizes() == theta_0.sizes(), "param_distance: mask must have theta_0's shape ",
                theta_0.sizes(), ", got ", mask->sizes());
    TORCH_CHECK(mask->scalar_type() == at::kBool || mask->is_floating_point(),
                "param_distance: mask must be bool or floating point, got ", mask->scalar_type());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> param_distance_cpu(const at::Tensor& theta_0,
                                                                  const at::Tensor& theta_T,
                                                                  const at::Tensor& grad_sum,
                                                                  const at::Tensor& alpha,
                                                                  const c10::optional<at::Tensor>& mask) {
  check_inputs(theta_0, theta_T, grad_sum, alpha, mask);
  auto t0 = theta_0.contiguous();
  auto tT = theta_T.contiguous();
  auto gs = grad_sum.contiguous();
  auto v = at::empty_like(t0);
  auto loss = at::empty({}, t0.options());
  auto d_alpha = at::empty({}, t0.options());
  const int64_t n = t0.numel();
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  // A bool mask is read as bytes; a float mask weighs each squared term by m^2 (m enters both norms).
  const bool bool_mask = mask.has_value() && mask->scalar_type() == at::kBool;
  at::Tensor m;
  if (mask.has_value()) m = bool_mask ? mask->contiguous() : mask->to(t0.scalar_type()).contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t0.scalar_type(), "param_distance_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const double a = alpha.item<double>();
    const scalar_t* p0 = t0.const_data_ptr<scalar_t>();
    const scalar_t* pT = tT.const_data_ptr<scalar_t>();
    const scalar_t* pg = gs.const_data_ptr<scalar_t>();
    const bool* mb = bool_mask ? m.const_data_ptr<bool>() : nullptr;
    const scalar_t* mf = (m.defined() && !bool_mask) ? m.const_data_ptr<scalar_t>() : nullptr;
    // One loop body per mask kind, so the inner loops carry no branch and vectorise (omp simd).
    auto weight_of = [&](auto kind, int64_t i) -> opmath_t {
      if constexpr (decltype(kind)::value == 1) return static_cast<opmath_t>(mb[i]);
      else if constexpr (decltype(kind)::value == 2) { const opmath_t w = static_cast<opmath_t>(mf[i]); return w * w; }
      else return opmath_t(1);
    };
    auto run = [&](auto kind) {
      // Each chunk sums in the op's math type with vector lanes (omp simd); chunks combine in double, since P
      // reaches 1e7 and late in training the loss is a ratio of two close sums.
      // partial[c] = {D, N, S} = {sum m2 e^2, sum m2 r^2, sum m2 g r}, e = theta_0 - theta_T, r = e - a g.
      std::vector<std::array<double, 3>> partial(chunks);
      const opmath_t am = static_cast<opmath_t>(a);
      at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
        for (int64_t c = cb; c < ce; ++c) {
          opmath_t d = 0, num = 0, s = 0;
          const int64_t end = std::min(n, (c + 1) * kChunk);
          _Pragma("omp simd reduction(+ : d, num, s)")
          for (int64_t i = c * kChunk; i < end; ++i) {
            const opmath_t w = weight_of(kind, i);
            const opmath_t e = static_cast<opmath_t>(p0[i]) - static_cast<opmath_t>(pT[i]);
            const opmath_t g = static_cast<opmath_t>(pg[i]);
            const opmath_t r = e - am * g;
            d += w * e * e;
            num += w * r * r;
            s += w * g * r;
          }
          partial[c] = {static_cast<double>(d), static_cast<double>(num), static_cast<double>(s)};
        }
      });
      double d = 0, num = 0, s = 0;  // combined in chunk order: independent of the thread count
      for (const auto& p : partial) { d += p[0]; num += p[1]; s += p[2]; }
      // D = 0 (theta_0 == theta_T on the mask, or an all-False mask) gives inf/nan as the reference does;
      // the Python wrapper rejects an all-False mask before calling.
      loss.fill_(num / d);
      d_alpha.fill_(-2.0 * s / d);

      // v = -2 a m2 r / D = 2 m2 (a (theta_T - theta_0) + a^2 G) / D
      const opmath_t scale = static_cast<opmath_t>(-2.0 * a / d);
      const opmath_t af = static_cast<opmath_t>(a);
      scalar_t* pv = v.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, n, kChunk, [&](int64_t begin, int64_t end) {
      _Pragma("omp simd")
        for (int64_t i = begin; i < end; ++i) {
          const opmath_t r = static_cast<opmath_t>(p0[i]) - static_cast<opmath_t>(pT[i]) - af * static_cast<opmath_t>(pg[i]);
          pv[i] = static_cast<scalar_t>(scale * weight_of(kind, i) * r);
        }
      });
    };
    if (mb) run(std::integral_constant<int, 1>{});
    else if (mf) run(std::integral_constant<int, 2>{});
    else run(std::integral_constant<int, 0>{});
  });
  return {loss, v, d_alpha};
}

}  // namespace

TORCH_LIBRARY_IMPL(ltdd_fast, CPU, m) {
  m.impl("param_distance", &param_distance_cpu);
}
