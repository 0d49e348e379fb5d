// CPU kernel of ltdd_fast::soft_ce_stats: class-weighted soft-label cross-entropy (DAM), both logit gradients and
// per-class statistics in one sweep over the rows. Rows run in parallel; per-row results are combined in row
// order afterwards, so every output is independent of the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "fast_math.h"

namespace {

void check_inputs(const at::Tensor& logits, const at::Tensor& target_logits,
                  const c10::optional<at::Tensor>& class_weights, const at::Tensor& classes, int64_t num_classes) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(0) > 0 && logits.size(1) > 0,
              "soft_ce_stats: logits must be [B, C] with B, C > 0, got ", logits.sizes());
  TORCH_CHECK(logits.is_floating_point(), "soft_ce_stats: logits must be floating point, got ",
              logits.scalar_type());
  TORCH_CHECK(target_logits.sizes() == logits.sizes() && target_logits.scalar_type() == logits.scalar_type(),
              "soft_ce_stats: target_logits must match logits (", logits.sizes(), ", ", logits.scalar_type(),
              "), got (", target_logits.sizes(), ", ", target_logits.scalar_type(), ")");
  if (class_weights.has_value()) {
    TORCH_CHECK(class_weights->dim() == 1 && class_weights->size(0) == logits.size(1),
                "soft_ce_stats: class_weights must be [", logits.size(1), "], got ", class_weights->sizes());
    TORCH_CHECK(class_weights->is_floating_point(), "soft_ce_stats: class_weights must be floating point");
  }
  TORCH_CHECK(classes.dim() == 1 && classes.size(0) == logits.size(0) && classes.scalar_type() == at::kLong,
              "soft_ce_stats: classes must be int64 [", logits.size(0), "], got ", classes.scalar_type(), " ",
              classes.sizes());
  TORCH_CHECK(num_classes > 0, "soft_ce_stats: num_classes must be positive, got ", num_classes);
}

// The row exponentials: the vectorisable fast_exp for float math (fp32/fp16/bf16 inputs), libm's for fp64.
LTDD_ALWAYS_INLINE float row_exp(float x) { return ltdd_fast::fast_exp(x); }
inline double row_exp(double x) { return std::exp(x); }

struct RowStats {
  double loss, norm2;
};

// The row loops run in chunks of kLanes<T> elements, one accumulator per lane, and a row's last partial chunk
// through padded copies: no scalar remainder loops, and lane accumulators combined by a fixed tree (a few vector
// adds) instead of the scalar walk over the lanes that `omp simd reduction` leaves after every loop, which is
// where a row of 10 classes would otherwise spend most of its time. fp64 keeps libm's exp, which does not
// vectorise, so its chunks are single elements: the loops are then the plain sequential ones.
template <typename T>
constexpr int64_t kLanes = std::is_same_v<T, float> ? 64 / sizeof(T) : 1;

// A GCC/Clang vector of N T's, for the tree steps: on arrays each halving step would store a vector and load back
// its halves, which defeats store forwarding; on vector values it stays in registers. (Only ever a local: as a
// parameter or return value its ABI would depend on the target's vector width.)
template <typename T, int64_t N>
struct VecN {
  typedef T type __attribute__((vector_size(N * sizeof(T))));
};

// max as std::max(acc, x) takes it: NaN entries are skipped (they make the row NaN later anyway).
template <typename T>
LTDD_ALWAYS_INLINE T max_skip_nan(T acc, T x) {
  return acc < x ? x : acc;
}

// a[0] op ... op a[K-1] as the fixed tree that combines lane k + K/2 into lane k, halving until one lane is left
// (op works lane by lane on GCC vector types).
template <int64_t K, typename T, typename Op>
LTDD_ALWAYS_INLINE T lane_reduce(const T* a, Op op) {
  if constexpr (K == 1) {
    return a[0];
  } else {
    typename VecN<T, K / 2>::type x, y;
    std::memcpy(&x, a, sizeof x);
    std::memcpy(&y, a + K / 2, sizeof y);
    x = op(x, y);
    alignas(64) T h[K / 2];
    std::memcpy(h, &x, sizeof x);
    return lane_reduce<K / 2>(h, op);
  }
}

template <int64_t K, typename T>
LTDD_ALWAYS_INLINE T lane_sum(const T* a) {
  return lane_reduce<K>(a, [](auto x, auto y) { return x + y; });
}

// The same tree for the max (max_skip_nan lane by lane).
template <int64_t K, typename T>
LTDD_ALWAYS_INLINE T lane_max(const T* a) {
  return lane_reduce<K>(a, [](auto x, auto y) { return x < y ? y : x; });
}

// acc += block, lane by lane: a block's lane sums (in T) into the row's running lane sums (in double).
template <int64_t K, typename T>
LTDD_ALWAYS_INLINE void add_lanes(double* __restrict acc, const T* __restrict block) {
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) acc[k] += static_cast<double>(block[k]);
}

template <typename T>
LTDD_ALWAYS_INLINE void max_chunk(const T* __restrict z, const T* __restrict t, T* __restrict mz, T* __restrict mt) {
#pragma omp simd
  for (int64_t k = 0; k < kLanes<T>; ++k) {
    mz[k] = max_skip_nan(mz[k], z[k]);
    mt[k] = max_skip_nan(mt[k], t[k]);
  }
}

// The exponentials of one chunk, into ez and et, and the lane sums of e^d (into zs, in T), e^u, w e^u and
// w e^u (-d) (into ts, ws and as, in double), with d = z - max z and u = t - max t. kTail: the lanes where mask is
// 0 are padding, with z = max z and t = max t (so d = u = 0, finite) and w = 0; their exponentials are multiplied
// by 0, so they add exactly nothing (the other lanes' by 1).
template <bool kTail, typename T>
LTDD_ALWAYS_INLINE void exp_chunk(const T* __restrict z, const T* __restrict t, const T* __restrict w, T zmax,
                                  T tmax, T* __restrict ez, T* __restrict et, T* __restrict zs,
                                  double* __restrict ts, double* __restrict ws, double* __restrict as,
                                  const T* __restrict mask) {
#pragma omp simd
  for (int64_t k = 0; k < kLanes<T>; ++k) {
    const T d = z[k] - zmax;
    T a = row_exp(d), b = row_exp(t[k] - tmax);
    if constexpr (kTail) {  // a multiply, not a select: GCC 12 does not if-convert a select after the exp
      a *= mask[k];
      b *= mask[k];
    }
    ez[k] = a;
    et[k] = b;
    const T wb = w[k] * b;
    zs[k] += a;
    ts[k] += b;
    ws[k] += wb;
    as[k] += wb * -d;
  }
}

// Both gradients of one chunk, and the lane sums of grad_logits^2 (padding lanes give 0: p = 0 and w = 0).
// l = l_hi + l_lo: grad_target's (a_c - l) cancels when a_c is close to l, so l keeps ~48 bits there.
template <typename T, typename O>
LTDD_ALWAYS_INLINE void grad_chunk(const T* __restrict z, const T* __restrict w, const T* __restrict ez,
                                   const T* __restrict et, T zmax, T L, T l_hi, T l_lo, T s, T inv_z, T inv_t,
                                   T inv_b, O* __restrict gz, O* __restrict gt, T* __restrict n2) {
#pragma omp simd
  for (int64_t k = 0; k < kLanes<T>; ++k) {
    const T p = et[k] * inv_t;
    const T dz = (ez[k] * inv_z * s - w[k] * p) * inv_b;
    gz[k] = static_cast<O>(dz);
    gt[k] = static_cast<O>(p * ((w[k] * (L - (z[k] - zmax)) - l_hi) - l_lo) * inv_b);
    n2[k] += dz * dz;
  }
}

// One row in math type T: z, t its logits and targets, w the class weights (ones when there are none), ez and et
// scratch for the exponentials (each taken once; C rounded up to whole chunks), gz and gt the row's gradients.
//
// With d_c = z_c - max z, L = log sum_c e^(d_c) (so -log q_c = L - d_c) and p_c = e^(t_c - max t) / T:
//   l = sum_c w_c p_c (L - d_c) = (L S + A) / T,   T = sum_c e^(t_c - max t),   S = sum_c w_c e^(t_c - max t),
//   A = sum_c w_c e^(t_c - max t) (-d_c)
// T, S and A are sums of non-negative terms (for non-negative weights) taken in the same sweep as the
// exponentials, so a row is three passes: the max, the exponentials and the gradients. grad_target's
// p_c (a_c - l), a_c = w_c (L - d_c), shows l's relative error magnified by l / |a_c - l|, so T, S and A are
// summed in double element by element (a serial float sum loses ~1e-5 relative at C = 1000; even float lane sums
// over 8-chunk blocks doubled grad_target's error), and l uses the same rounded L as a_c, so that difference stays
// consistent. The sum of e^(d_c) only sets L and the scale of q, and sum_c grad_logits^2 only class_grad_norm,
// where relative errors pass through unmagnified: those sum blocks of kBlock chunks (kBlock + 1 for the last, which
// takes the padded one) per lane in T before each double add, which saves ~15% of a row's time over summing them in
// double too.
template <typename T, typename scalar_t>
RowStats soft_ce_row(const T* __restrict z, const T* __restrict t, const T* __restrict w, T* __restrict ez,
                     T* __restrict et, scalar_t* __restrict gz, scalar_t* __restrict gt, int64_t C, T inv_b) {
  constexpr int64_t K = kLanes<T>, kBlock = 8;
  constexpr T kInf = std::numeric_limits<T>::infinity();
  const int64_t Cm = C - C % K, r = C % K;  // Cm classes in full chunks, then r in a padded one
  const int64_t nfull = Cm / K;
  alignas(64) T zt[K], tt[K], wt[K], mask[K];
  if (r > 0) {
    // One vector loop (masked loads), so that the chunk loops read these back from whole-vector stores.
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) {
      zt[k] = k < r ? z[Cm + k] : -kInf;  // -inf leaves the max alone
      tt[k] = k < r ? t[Cm + k] : -kInf;
      wt[k] = k < r ? w[Cm + k] : T(0);
      mask[k] = k < r ? T(1) : T(0);
    }
  }

  alignas(64) T mz[K], mt[K];
  for (int64_t k = 0; k < K; ++k) mz[k] = mt[k] = -kInf;
  for (int64_t c = 0; c < Cm; c += K) max_chunk(z + c, t + c, mz, mt);
  if (r > 0) max_chunk(zt, tt, mz, mt);
  const T zmax = lane_max<K>(mz), tmax = lane_max<K>(mt);

  alignas(64) double zs[K] = {}, ts[K] = {}, ws[K] = {}, as[K] = {};
  alignas(64) T bz[K] = {};
  for (int64_t j0 = 0; j0 < nfull; j0 += kBlock) {
    const int64_t j1 = std::min(nfull, j0 + kBlock);
    for (int64_t c = j0 * K; c < j1 * K; c += K)
      exp_chunk<false>(z + c, t + c, w + c, zmax, tmax, ez + c, et + c, bz, ts, ws, as, static_cast<const T*>(nullptr));
    if (j1 < nfull) {  // the last block stays open for the padded chunk
      add_lanes<K>(zs, bz);
      for (int64_t k = 0; k < K; ++k) bz[k] = T(0);
    }
  }
  if (r > 0) {
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) {  // the padding now gives d = u = 0 (see exp_chunk)
      zt[k] = k < r ? zt[k] : zmax;
      tt[k] = k < r ? tt[k] : tmax;
    }
    exp_chunk<true>(zt, tt, wt, zmax, tmax, ez + Cm, et + Cm, bz, ts, ws, as, mask);
  }
  add_lanes<K>(zs, bz);
  const double zsum = lane_sum<K>(zs), tsum = lane_sum<K>(ts), wsum = lane_sum<K>(ws), asum = lane_sum<K>(as);

  const T L = static_cast<T>(std::log(zsum));
  const double inv_t_d = 1.0 / tsum;
  const double l_d = (static_cast<double>(L) * wsum + asum) * inv_t_d;
  const T l_hi = static_cast<T>(l_d), l_lo = static_cast<T>(l_d - static_cast<double>(l_hi));
  const T s = static_cast<T>(wsum * inv_t_d);
  const T inv_z = static_cast<T>(1.0 / zsum), inv_t = static_cast<T>(inv_t_d);
  // d loss / d z_c = (q_c s - w_c p_c) / B;  d loss / d t_c = p_c (w_c (L - d_c) - l) / B
  alignas(64) double n2[K] = {};
  alignas(64) T bn[K] = {};
  for (int64_t j0 = 0; j0 < nfull; j0 += kBlock) {
    const int64_t j1 = std::min(nfull, j0 + kBlock);
    for (int64_t c = j0 * K; c < j1 * K; c += K)
      grad_chunk(z + c, w + c, ez + c, et + c, zmax, L, l_hi, l_lo, s, inv_z, inv_t, inv_b, gz + c, gt + c, bn);
    if (j1 < nfull) {
      add_lanes<K>(n2, bn);
      for (int64_t k = 0; k < K; ++k) bn[k] = T(0);
    }
  }
  if (r > 0) {
    alignas(64) T gzt[K], gtt[K];
    grad_chunk(zt, wt, ez + Cm, et + Cm, zmax, L, l_hi, l_lo, s, inv_z, inv_t, inv_b, gzt, gtt, bn);
#pragma omp simd  // masked stores
    for (int64_t k = 0; k < K; ++k) {
      if (k < r) {
        gz[Cm + k] = static_cast<scalar_t>(gzt[k]);
        gt[Cm + k] = static_cast<scalar_t>(gtt[k]);
      }
    }
  }
  add_lanes<K>(n2, bn);
  return {l_d, lane_sum<K>(n2)};
}

// All rows, in parallel; row i's loss and squared gradient norm go to row_loss[i] and row_norm2[i].
template <typename scalar_t>
void soft_ce_rows(const scalar_t* zp, const scalar_t* tp, const at::opmath_type<scalar_t>* w, scalar_t* gz,
                  scalar_t* gt, int64_t B, int64_t C, double* row_loss, double* row_norm2) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr bool kConvert = !std::is_same_v<scalar_t, opmath_t>;  // fp16/bf16 rows are widened first
  const opmath_t inv_b = opmath_t(1) / static_cast<opmath_t>(B);
  // Enough rows per task that a task touches ~16k logits.
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / C);
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    // Scratch: the row's two exponentials, and its widened logits and targets for fp16/bf16. On the stack up to
    // kStackC classes, so a task allocates nothing.
    constexpr int64_t K = kLanes<opmath_t>, kStackC = 1024, kBufs = kConvert ? 4 : 2;
    const int64_t Cp = (C + K - 1) / K * K;  // ez and et take the padded last chunk too
    alignas(64) opmath_t stack_buf[kBufs * kStackC];
    std::vector<opmath_t> heap_buf;
    opmath_t* buf = stack_buf;
    if (Cp > kStackC) {
      heap_buf.resize(kBufs * Cp);
      buf = heap_buf.data();
    }
    opmath_t* ez = buf;
    opmath_t* et = buf + Cp;
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* zi = zp + i * C;
      const scalar_t* ti = tp + i * C;
      const opmath_t* zr;
      const opmath_t* tr;
      if constexpr (kConvert) {
        opmath_t* zc = buf + 2 * Cp;
        opmath_t* tc = buf + 3 * Cp;
        for (int64_t c = 0; c < C; ++c) {
          zc[c] = static_cast<opmath_t>(zi[c]);
          tc[c] = static_cast<opmath_t>(ti[c]);
        }
        zr = zc;
        tr = tc;
      } else {
        zr = zi;
        tr = ti;
      }
      const RowStats r = soft_ce_row(zr, tr, w, ez, et, gz + i * C, gt + i * C, C, inv_b);
      row_loss[i] = r.loss;
      row_norm2[i] = r.norm2;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_ce_stats_cpu(
    const at::Tensor& logits, const at::Tensor& target_logits, const c10::optional<at::Tensor>& class_weights,
    const at::Tensor& classes, int64_t num_classes) {
  check_inputs(logits, target_logits, class_weights, classes, num_classes);
  auto z = logits.contiguous();
  auto t = target_logits.contiguous();
  auto cls = classes.contiguous();
  const int64_t B = z.size(0), C = z.size(1);
  const int64_t* cp = cls.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i)  // before any work, so a bad label never writes out of bounds
    TORCH_CHECK(cp[i] >= 0 && cp[i] < num_classes, "soft_ce_stats: classes[", i, "] = ", cp[i],
                " is outside [0, ", num_classes, ")");
  // Weights take the logits' dtype, as the reference's class_weights.to(per_class) does.
  at::Tensor w = class_weights.has_value() ? class_weights->to(z.scalar_type()).contiguous() : at::Tensor();

  auto grad_logits = at::empty_like(z);
  auto grad_target = at::empty_like(t);
  auto loss = at::empty({}, z.options());
  auto class_loss_sum = at::zeros({num_classes}, z.options());
  auto class_count = at::zeros({num_classes}, cls.options());
  auto class_grad_norm = at::zeros({num_classes}, z.options());
  std::vector<double> row_loss(B), row_norm2(B);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "soft_ce_stats_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    scalar_t* gz = grad_logits.mutable_data_ptr<scalar_t>();
    scalar_t* gt = grad_target.mutable_data_ptr<scalar_t>();
    std::vector<opmath_t> wv(C, opmath_t(1));
    if (w.defined()) {
      const scalar_t* wp = w.const_data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) wv[c] = static_cast<opmath_t>(wp[c]);
    }
    soft_ce_rows(zp, tp, wv.data(), gz, gt, B, C, row_loss.data(), row_norm2.data());

    // Combine in row order (B is a batch: cheap next to the rows' exponentials).
    std::vector<double> loss_sum(num_classes, 0.0), norm2_sum(num_classes, 0.0);
    int64_t* cnt = class_count.mutable_data_ptr<int64_t>();
    double total = 0;
    for (int64_t i = 0; i < B; ++i) {
      total += row_loss[i];
      loss_sum[cp[i]] += row_loss[i];
      norm2_sum[cp[i]] += row_norm2[i];
      cnt[cp[i]] += 1;
    }
    loss.fill_(total / static_cast<double>(B));
    scalar_t* ls = class_loss_sum.mutable_data_ptr<scalar_t>();
    scalar_t* gn = class_grad_norm.mutable_data_ptr<scalar_t>();
    for (int64_t k = 0; k < num_classes; ++k) {
      ls[k] = static_cast<scalar_t>(loss_sum[k]);
      gn[k] = static_cast<scalar_t>(std::sqrt(norm2_sum[k]));
    }
  });
  return {loss, grad_logits, grad_target, class_loss_sum, class_count, class_grad_norm};
}

}  // namespace

TORCH_LIBRARY_IMPL(ltdd_fast, CPU, m) {
  m.impl("soft_ce_stats", &soft_ce_stats_cpu);
}
