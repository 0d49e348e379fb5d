// CPU kernel of ltdd_fast::param_distance: the normalised parameter distance, its gradient v w.r.t. grad_sum and
// d loss / d alpha. One reduction pass for the three sums, one pass writing v (v needs the denominator D).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "fast_math.h"
#include "large_output.h"

namespace {

// Fixed chunks, combined in order: the sums do not depend on the thread count.
constexpr int64_t kChunk = 1 << 14;
// Elements per parallel task (a multiple of kChunk): on 2 cores one thread was faster at 70k elements, two at 140k.
constexpr int64_t kGrain = 1 << 17;

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

// One loop body per mask kind, so the inner loops carry no branch and vectorise (omp simd).
enum class MaskKind { kNone, kBool, kFloat };

template <typename scalar_t>
struct Inputs {
  const scalar_t* p0;
  const scalar_t* pT;
  const scalar_t* pg;
  const uint8_t* mb;   // a bool mask read as bytes (0 or 1): GCC does not vectorise loads of bool
  const scalar_t* mf;  // a float mask; each squared term is weighted by m^2 (m enters both norms)
};

template <MaskKind kind, typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
LTDD_ALWAYS_INLINE opmath_t weight(const Inputs<scalar_t>& in, int64_t i) {
  if constexpr (kind == MaskKind::kBool) {
    return static_cast<opmath_t>(in.mb[i]);
  } else if constexpr (kind == MaskKind::kFloat) {
    const opmath_t w = static_cast<opmath_t>(in.mf[i]);
    return w * w;
  } else {
    return opmath_t(1);
  }
}

// Element i's terms of the three sums below.
template <MaskKind kind, typename scalar_t, typename opmath_t>
LTDD_ALWAYS_INLINE void accumulate(const Inputs<scalar_t>& in, opmath_t a, int64_t i, opmath_t& d, opmath_t& num,
                                   opmath_t& s) {
  const opmath_t w = weight<kind>(in, i);
  const opmath_t e = static_cast<opmath_t>(in.p0[i]) - static_cast<opmath_t>(in.pT[i]);
  const opmath_t g = static_cast<opmath_t>(in.pg[i]);
  const opmath_t r = e - a * g;
  d += w * e * e;
  num += w * r * r;
  s += w * g * r;
}

// {D, N, S} = {sum m2 e^2, sum m2 r^2, sum m2 g r} over [begin, end), e = theta_0 - theta_T, r = e - a g. K
// accumulators per sum (several vector registers): one would be bound by the add latency, several times slower
// than the loads. Lanes are combined in a fixed order.
template <MaskKind kind, typename scalar_t, typename opmath_t>
std::array<double, 3> chunk_sums(const Inputs<scalar_t>& in, opmath_t a, int64_t begin, int64_t end) {
  constexpr int64_t K = 128 / sizeof(opmath_t);
  opmath_t d[K] = {}, num[K] = {}, s[K] = {};
  int64_t i = begin;
  for (; i + K <= end; i += K) {
    _Pragma("omp simd")
    for (int64_t k = 0; k < K; ++k) accumulate<kind>(in, a, i + k, d[k], num[k], s[k]);
  }
  for (int64_t k = 0; i < end; ++i, ++k) accumulate<kind>(in, a, i, d[k], num[k], s[k]);
  std::array<double, 3> out = {0, 0, 0};
  for (int64_t k = 0; k < K; ++k) {
    out[0] += static_cast<double>(d[k]);
    out[1] += static_cast<double>(num[k]);
    out[2] += static_cast<double>(s[k]);
  }
  return out;
}

template <MaskKind kind, typename scalar_t>
void distance(const Inputs<scalar_t>& in, int64_t n, double a, at::Tensor& loss, at::Tensor& v,
              at::Tensor& d_alpha) {
  using opmath_t = at::opmath_type<scalar_t>;
  // Each chunk sums in the op's math type; chunks combine in double, since P reaches 1e7 and late in training
  // the loss is a ratio of two close sums.
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<std::array<double, 3>> partial(chunks);
  const opmath_t am = static_cast<opmath_t>(a);
  at::parallel_for(0, chunks, kGrain / kChunk, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c)
      partial[c] = chunk_sums<kind>(in, am, c * kChunk, std::min(n, (c + 1) * kChunk));
  });
  double d = 0, num = 0, s = 0;  // combined in chunk order: independent of the thread count
  for (const auto& p : partial) {
    d += p[0];
    num += p[1];
    s += p[2];
  }
  // D = 0 (theta_0 == theta_T on the mask, or an all-False mask) gives inf/nan as the reference does;
  // the Python wrapper rejects an all-False mask before calling.
  *loss.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(num / d);
  *d_alpha.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(-2.0 * s / d);

  // v = -2 a m2 r / D = 2 m2 (a (theta_T - theta_0) + a^2 G) / D
  const opmath_t scale = static_cast<opmath_t>(-2.0 * a / d);
  scalar_t* pv = v.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    _Pragma("omp simd")
    for (int64_t i = begin; i < end; ++i) {
      const opmath_t r = static_cast<opmath_t>(in.p0[i]) - static_cast<opmath_t>(in.pT[i]) -
                         am * static_cast<opmath_t>(in.pg[i]);
      pv[i] = static_cast<scalar_t>(scale * weight<kind>(in, i) * r);
    }
  });
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
  auto v = ltdd_fast::empty_output(t0);
  auto loss = at::empty({}, t0.options());
  auto d_alpha = at::empty({}, t0.options());
  const int64_t n = t0.numel();
  const bool bool_mask = mask.has_value() && mask->scalar_type() == at::kBool;
  at::Tensor m;
  if (mask.has_value()) m = bool_mask ? mask->contiguous() : mask->to(t0.scalar_type()).contiguous();
  const double a = alpha.item<double>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t0.scalar_type(), "param_distance_cpu", [&] {
    const Inputs<scalar_t> in{t0.const_data_ptr<scalar_t>(), tT.const_data_ptr<scalar_t>(),
                              gs.const_data_ptr<scalar_t>(),
                              bool_mask ? static_cast<const uint8_t*>(m.const_data_ptr()) : nullptr,
                              (m.defined() && !bool_mask) ? m.const_data_ptr<scalar_t>() : nullptr};
    if (in.mb) distance<MaskKind::kBool>(in, n, a, loss, v, d_alpha);
    else if (in.mf) distance<MaskKind::kFloat>(in, n, a, loss, v, d_alpha);
    else distance<MaskKind::kNone>(in, n, a, loss, v, d_alpha);
  });
  return {loss, v, d_alpha};
}

}  // namespace

TORCH_LIBRARY_IMPL(ltdd_fast, CPU, m) {
  m.impl("param_distance", &param_distance_cpu);
}
