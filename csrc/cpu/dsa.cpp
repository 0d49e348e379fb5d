// CPU kernel of ltdd_fast::dsa: the whole DSA chain of one call (or its transpose) in one pass over each image,
// images in parallel. The arithmetic is csrc/dsa_chain.h's; each image is worked on in a buffer of the op's math
// type, so the transpose's scatter and its colour sums are serial per image (deterministic).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../dsa_args.h"

namespace {

using ltdd_fast::dsa::Chain;
using ltdd_fast::dsa::kMaxTaps;
using ltdd_fast::dsa::kNumColumns;

// by value, not std::min/max's references (which keep loops from vectorising)
template <typename T>
inline T clamp(T v, T lo, T hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// One row of the chain's taps (Chain::taps, which the CUDA kernel calls per pixel, in a row-at-a-time form that
// vectorises), structure of arrays: tap k of output pixel (i, j) reads the colour-adjusted image
// at flat index idx[k * W + j] with weight w[k * W + j]. Every pixel has the same number of taps (1, 4 or 16:
// each bilinear stage multiplies them by 4), a tap outside the image or in the cutout hole having weight 0 and a
// clamped index, so that every loop over a row's pixels is branch-free and vectorises.
template <typename A>
struct RowTaps {
  int K = 1;
  std::vector<int32_t> idx, y, x;
  std::vector<A> w, xn, yn;  // xn, yn: affine_grid's base coordinates of each column and row
  std::vector<A> gxs, gys, w0s;  // a bilinear stage's sampling points and incoming weights
  RowTaps(int64_t H, int64_t W)
      : idx(16 * W), y(16 * W), x(16 * W), w(16 * W), xn(W), yn(H), gxs(W), gys(W), w0s(W) {
    for (int64_t j = 0; j < W; ++j) xn[j] = Chain<A>::grid_coord(j, W);
    for (int64_t i = 0; i < H; ++i) yn[i] = Chain<A>::grid_coord(i, H);
  }

  // Bilinear sampling at the points (gx[j], gy[j]) of a row, each point carrying weight w0[j]: its 4 corners
  // become taps out[c], c = 2 dy + dx, at (ys, xs) + c * W with weight w0 times the corner's share (and 0 for a
  // corner outside the image: zero padding). Flat loops over local arrays, so that they vectorise.
  static void corners(const A* __restrict gx, const A* __restrict gy, const A* __restrict w0, int64_t H, int64_t W,
                      int32_t* __restrict ys, int32_t* __restrict xs, A* __restrict ws) {
    const A wm1 = static_cast<A>(W - 1), hm1 = static_cast<A>(H - 1);
    const A xmax = static_cast<A>(W + 1), ymax = static_cast<A>(H + 1);
    const int32_t h = static_cast<int32_t>(H), w = static_cast<int32_t>(W);
    _Pragma("omp simd")
    for (int64_t j = 0; j < W; ++j) {
      // a point this far out has no corner inside: clamping keeps the integer conversion defined
      A ix = ((gx[j] + A(1)) / A(2)) * wm1, iy = ((gy[j] + A(1)) / A(2)) * hm1;
      ix = ix < A(-2) ? A(-2) : ix;
      ix = ix > xmax ? xmax : ix;
      iy = iy < A(-2) ? A(-2) : iy;
      iy = iy > ymax ? ymax : iy;
      // floor, as truncation corrected below zero (std::floor keeps GCC from vectorising the loop)
      int32_t x0 = static_cast<int32_t>(ix), y0 = static_cast<int32_t>(iy);
      x0 -= static_cast<A>(x0) > ix;
      y0 -= static_cast<A>(y0) > iy;
      const A fx = static_cast<A>(x0), fy = static_cast<A>(y0);
      const A e = ix - fx, s = iy - fy;
      // branch-free (bitwise) bounds, so that the loop vectorises
      const A in_x0 = static_cast<A>((x0 >= 0) & (x0 < w)), in_x1 = static_cast<A>((x0 + 1 >= 0) & (x0 + 1 < w));
      const A in_y0 = static_cast<A>((y0 >= 0) & (y0 < h)), in_y1 = static_cast<A>((y0 + 1 >= 0) & (y0 + 1 < h));
      const A wj = w0[j];
      ys[j] = y0, xs[j] = x0, ws[j] = in_y0 * in_x0 * (wj * (A(1) - e) * (A(1) - s));
      ys[W + j] = y0, xs[W + j] = x0 + 1, ws[W + j] = in_y0 * in_x1 * (wj * e * (A(1) - s));
      ys[2 * W + j] = y0 + 1, xs[2 * W + j] = x0, ws[2 * W + j] = in_y1 * in_x0 * (wj * (A(1) - e) * s);
      ys[3 * W + j] = y0 + 1, xs[3 * W + j] = x0 + 1, ws[3 * W + j] = in_y1 * in_x1 * (wj * e * s);
    }
  }

  void build(const Chain<A>& ch, int64_t i) {
    const int64_t H = ch.H, W = ch.W;
    int32_t* ys = y.data();
    int32_t* xs = x.data();
    A* ws = w.data();
    A* gx = gxs.data();
    A* gy = gys.data();
    A* w1 = w0s.data();
    K = 1;
    if (ch.rotate) {  // theta = [[cos, sin, 0], [-sin, cos, 0]]
      const A c = ch.cos_a, s = ch.sin_a, yi = yn[i];
      const A* xr = xn.data();
      _Pragma("omp simd")
      for (int64_t j = 0; j < W; ++j) {
        gx[j] = c * xr[j] + s * yi;
        gy[j] = -s * xr[j] + c * yi;
        w1[j] = A(1);
      }
      corners(gx, gy, w1, H, W, ys, xs, ws);
      K = 4;
    } else {
      for (int64_t j = 0; j < W; ++j) {
        ys[j] = static_cast<int32_t>(i);
        xs[j] = static_cast<int32_t>(j);
        ws[j] = A(1);
      }
    }
    if (ch.scale) {  // theta = [[sx, 0, 0], [0, sy, 0]], on each tap so far (taps 4k.. replace tap k: last first)
      const A sx = ch.sx, sy = ch.sy;
      const int32_t h = static_cast<int32_t>(H), w = static_cast<int32_t>(W);
      const A* xr = xn.data();
      const A* yr = yn.data();
      for (int k = K - 1; k >= 0; --k) {
        const int32_t* yk = ys + k * W;
        const int32_t* xk = xs + k * W;
        const A* wk = ws + k * W;
        _Pragma("omp simd")
        for (int64_t j = 0; j < W; ++j) {
          // a tap outside the image has weight 0 (rotate's zero padding): clamped only to look up coordinates
          const int32_t yc = clamp(yk[j], 0, h - 1), xc = clamp(xk[j], 0, w - 1);
          gx[j] = sx * xr[xc];
          gy[j] = sy * yr[yc];
          w1[j] = wk[j];
        }
        corners(gx, gy, w1, H, W, ys + 4 * k * W, xs + 4 * k * W, ws + 4 * k * W);
      }
      K *= 4;
    }
    // the integer ops on every tap, then the flat index (clamped where the weight is 0)
    const int32_t h = static_cast<int32_t>(H), w = static_cast<int32_t>(W);
    const int32_t flip = ch.flip, cut = ch.cutout;
    const int32_t hy0 = static_cast<int32_t>(ch.hole_y0), hy1 = static_cast<int32_t>(ch.hole_y1);
    const int32_t hx0 = static_cast<int32_t>(ch.hole_x0), hx1 = static_cast<int32_t>(ch.hole_x1);
    const int32_t cy = static_cast<int32_t>(ch.crop_y), cx = static_cast<int32_t>(ch.crop_x);
    int32_t* ix = idx.data();
    _Pragma("omp simd")
    for (int64_t t = 0; t < K * W; ++t) {
      int32_t yy = ys[t], xx = xs[t];
      xx = flip * (w - 1 - xx) + (1 - flip) * xx;
      const int32_t holed = cut & (yy >= hy0) & (yy < hy1) & (xx >= hx0) & (xx < hx1);
      yy -= cy;
      xx -= cx;
      const int32_t keep = (1 - holed) & (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w);
      ws[t] = static_cast<A>(keep) * ws[t];
      ix[t] = clamp(yy, 0, h - 1) * w + clamp(xx, 0, w - 1);
    }
  }
};

// buf <- the colour-adjusted image x (the whole image: contrast needs its mean)
template <typename scalar_t, typename A>
void colour_image(const Chain<A>& ch, const scalar_t* x, int64_t C, A* buf, A* pixel_mean) {
  const int64_t HW = ch.H * ch.W;
  for (int64_t e = 0; e < C * HW; ++e) buf[e] = static_cast<A>(x[e]);
  if (!ch.colour()) return;
  if (ch.sat) {
    for (int64_t p = 0; p < HW; ++p) pixel_mean[p] = A(0);
    for (int64_t c = 0; c < C; ++c) {
      const A* bc = buf + c * HW;
      _Pragma("omp simd")
      for (int64_t p = 0; p < HW; ++p) pixel_mean[p] += bc[p] + ch.add;
    }
    _Pragma("omp simd")
    for (int64_t p = 0; p < HW; ++p) pixel_mean[p] /= static_cast<A>(C);
  }
  A total = 0;
  for (int64_t c = 0; c < C; ++c) {
    A* bc = buf + c * HW;
    _Pragma("omp simd reduction(+ : total)")
    for (int64_t p = 0; p < HW; ++p) {
      A v = bc[p] + ch.add;
      if (ch.sat) v = (v - pixel_mean[p]) * ch.sat_f + pixel_mean[p];
      bc[p] = v;
      total += v;
    }
  }
  if (ch.con) {
    const A mean = total / static_cast<A>(C * HW);
    _Pragma("omp simd")
    for (int64_t e = 0; e < C * HW; ++e) buf[e] = (buf[e] - mean) * ch.con_f + mean;
  }
}

template <typename scalar_t, typename A>
void forward_image(const Chain<A>& ch, const scalar_t* x, scalar_t* out, int64_t C, A* buf, A* pixel_mean,
                   RowTaps<A>& rows) {
  A* row_acc = rows.gxs.data();  // free once the row's taps are built
  const int64_t H = ch.H, W = ch.W, HW = H * W;
  colour_image(ch, x, C, buf, pixel_mean);
  if (!ch.spatial()) {
    for (int64_t e = 0; e < C * HW; ++e) out[e] = static_cast<scalar_t>(buf[e]);
    return;
  }
  for (int64_t i = 0; i < H; ++i) {
    rows.build(ch, i);
    const int K = rows.K;
    const int32_t* idx = rows.idx.data();
    const A* w = rows.w.data();
    for (int64_t c = 0; c < C; ++c) {
      const A* __restrict src = buf + c * HW;
      A* __restrict acc = row_acc;
      for (int64_t j = 0; j < W; ++j) acc[j] = A(0);
      for (int k = 0; k < K; ++k) {
        const int32_t* ik = idx + k * W;
        const A* wk = w + k * W;
        _Pragma("omp simd")  // a dropped tap reads nothing (its clamped index may hold a NaN)
        for (int64_t j = 0; j < W; ++j) acc[j] += wk[j] != A(0) ? wk[j] * src[ik[j]] : A(0);
      }
      scalar_t* dst = out + c * HW + i * W;
      for (int64_t j = 0; j < W; ++j) dst[j] = static_cast<scalar_t>(acc[j]);
    }
  }
}

template <typename scalar_t, typename A>
void transpose_image(const Chain<A>& ch, const scalar_t* g, scalar_t* out, int64_t C, A* buf, RowTaps<A>& rows) {
  const int64_t H = ch.H, W = ch.W, HW = H * W;
  if (ch.spatial()) {
    for (int64_t e = 0; e < C * HW; ++e) buf[e] = A(0);
    for (int64_t i = 0; i < H; ++i) {
      rows.build(ch, i);
      const int K = rows.K;
      const int32_t* idx = rows.idx.data();
      const A* w = rows.w.data();
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* gc = g + c * HW + i * W;
        A* dst = buf + c * HW;
        for (int k = 0; k < K; ++k)
          for (int64_t j = 0; j < W; ++j) {
            const A wk = w[k * W + j];
            if (wk != A(0)) dst[idx[k * W + j]] += wk * static_cast<A>(gc[j]);
          }
      }
    }
  } else {
    for (int64_t e = 0; e < C * HW; ++e) buf[e] = static_cast<A>(g[e]);
  }
  if (ch.con || ch.sat) {
    A total = 0;
    if (ch.con) {
      _Pragma("omp simd reduction(+ : total)")
      for (int64_t e = 0; e < C * HW; ++e) total += buf[e];
    }
    const A k = ch.contrast_k(total, C * HW);
    for (int64_t p = 0; p < HW; ++p) {
      A sum = 0;
      for (int64_t c = 0; c < C; ++c) sum += buf[c * HW + p];
      for (int64_t c = 0; c < C; ++c) buf[c * HW + p] = ch.colour_transpose(buf[c * HW + p], sum, C, k);
    }
  }
  for (int64_t e = 0; e < C * HW; ++e) out[e] = static_cast<scalar_t>(buf[e]);
}

at::Tensor dsa_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& flags, int64_t cutout_h,
                   int64_t cutout_w, bool transpose) {
  ltdd_fast::dsa::check_args(x, values, flags, cutout_h, cutout_w);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  auto xc = x.contiguous();
  auto vc = values.contiguous();
  auto fc = flags.contiguous();
  auto out = at::empty(xc.sizes(), xc.options());  // row-major, as the fake: empty_like keeps odd strides
  if (x.numel() == 0) return out;
  const int32_t* fp = fc.const_data_ptr<int32_t>();
  const int64_t image = C * H * W;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "dsa_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* vp = vc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, (1 << 14) / image);
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      std::vector<A> buf(image), pixel_mean(H * W);
      RowTaps<A> rows(H, W);
      for (int64_t b = begin; b < end; ++b) {
        A v[kNumColumns];
        for (int k = 0; k < kNumColumns; ++k) v[k] = static_cast<A>(vp[b * kNumColumns + k]);
        const Chain<A> ch(fp, v, H, W, cutout_h, cutout_w);
        if (transpose)
          transpose_image(ch, xp + b * image, op + b * image, C, buf.data(), rows);
        else
          forward_image(ch, xp + b * image, op + b * image, C, buf.data(), pixel_mean.data(), rows);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ltdd_fast, CPU, m) {
  m.impl("dsa", &dsa_cpu);
}
