// Small inline math for the CPU kernels: branch-free functions that the compiler vectorises inside `omp simd`
// loops (the libm calls cannot be: std::exp may set errno and is a scalar call).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// Force inlining: a call left out of line (GCC stops inlining once a caller grows large) keeps the loop around it
// from being vectorised.
#if defined(__GNUC__)
#define LTDD_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define LTDD_ALWAYS_INLINE inline
#endif

namespace ltdd_fast {
namespace fast_math_detail {

// a * b + c, fused where the target has FMA (spelled out rather than left to -ffp-contract); without FMA
// std::fma is a scalar libm call, so fall back to two roundings there.
LTDD_ALWAYS_INLINE float fmadd(float a, float b, float c) {
#if defined(__FMA__) || defined(__aarch64__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

LTDD_ALWAYS_INLINE uint32_t bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

LTDD_ALWAYS_INLINE float from_bits(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

}  // namespace fast_math_detail

// exp(x) in float, at most 1.01 ulp from the exact value for normal results (checked on every float in
// [-104, 89] against double exp, built with FMA and without). exp(x) = 2^n e^r with n = round(x / ln 2) and
// |r| <= ln 2 / 2, e^r from Cephes' degree-7 minimax polynomial, 2^n built from exponent bits as two factors so
// that every n from -150 to 128 is exact (results below 2^-126 round once into the subnormals). Special values:
// exp(-inf) and anything below -104 give 0, exp(+inf) and anything above 88.73 give +inf, NaN gives NaN.
// Branch-free and errno-free, so `omp simd` loops calling it vectorise (selects become blends).
LTDD_ALWAYS_INLINE float fast_exp(float x) {
  namespace d = fast_math_detail;
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kShift = 12582912.0f;      // 1.5 * 2^23: adding it rounds to an integer held in the low bits
  constexpr float kLn2Hi = 0.693359375f;     // ln 2 = kLn2Hi + kLn2Lo, kLn2Hi with 9 significant bits, so
  constexpr float kLn2Lo = -2.12194440e-4f;  // n * kLn2Hi is exact for |n| <= 2^15
  // Clamp first (a NaN fails both comparisons and passes through): keeps n in [-150, 128].
  x = x < -104.0f ? -104.0f : x;
  x = x > 89.0f ? 89.0f : x;
  const float t = d::fmadd(x, kLog2e, kShift);
  const float n_f = t - kShift;
  const int32_t n = static_cast<int32_t>(d::bits(t) - d::bits(kShift));
  float r = d::fmadd(n_f, -kLn2Hi, x);
  r = d::fmadd(n_f, -kLn2Lo, r);
  float p = 1.9875691500e-4f;
  p = d::fmadd(p, r, 1.3981999507e-3f);
  p = d::fmadd(p, r, 8.3334519073e-3f);
  p = d::fmadd(p, r, 4.1665795894e-2f);
  p = d::fmadd(p, r, 1.6666665459e-1f);
  p = d::fmadd(p, r, 5.0000001201e-1f);
  const float y = d::fmadd(p, r * r, r) + 1.0f;  // e^r, in [0.7, 1.42]
  const int32_t n1 = n >> 1, n2 = n - n1;        // each in [-75, 64]: 2^n1 and 2^n2 are normal floats
  const float s1 = d::from_bits(static_cast<uint32_t>(n1 + 127) << 23);
  const float s2 = d::from_bits(static_cast<uint32_t>(n2 + 127) << 23);
  return y * s1 * s2;
}

}  // namespace ltdd_fast
