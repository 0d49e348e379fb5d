// The per-pixel arithmetic of the fused DSA chain (ltdd_fast::dsa), shared by its CPU and CUDA kernels; it
// includes neither torch nor CUDA headers.
//
// The chain, in the order ltdd_fast/augment.py applies it: color (brightness, saturation, contrast), crop,
// cutout, flip, scale, rotate, each op on or off per call (flags) with its own values per image. Every op is
// affine in the image, so the chain is y = A x (+ brightness's constant) and its transpose is x_bar = A^T y_bar:
// - color acts on each pixel's channels, with two means: the pixel's channel mean (saturation) and the image's
//   mean (contrast);
// - crop, cutout and flip map each output pixel to at most one input pixel;
// - scale and rotate sample their input bilinearly at an affine map of the output pixel (affine_grid and
//   grid_sample with align_corners=True and zero padding): 4 taps each.
// So an output pixel of the chain reads at most 16 pixels of the colour-adjusted image, found by chain_taps.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define LTDD_HD __host__ __device__ __forceinline__
#else
#define LTDD_HD inline
#endif

namespace ltdd_fast {
namespace dsa {

// flags[op] in this order (dsa_chain.OPS)
enum Op { kBrightness, kSaturation, kContrast, kCrop, kCutout, kFlip, kScale, kRotate, kNumOps };
// one row of values per image (dsa_chain.PACKED_COLUMNS): the draws of augment.DSA.sample
enum Column { kAdd, kSat, kCon, kCropY, kCropX, kCutY, kCutX, kFlipOn, kScaleX, kScaleY, kDegrees, kNumColumns };
constexpr int kMaxTaps = 16;

template <typename A>
LTDD_HD A floor_of(A x) {
#if defined(__CUDA_ARCH__)
  return floor(x);
#else
  return std::floor(x);
#endif
}

template <typename A>
LTDD_HD void cos_sin(A radians, A* c, A* s) {
#if defined(__CUDA_ARCH__)
  *c = cos(radians);
  *s = sin(radians);
#else
  *c = std::cos(radians);
  *s = std::sin(radians);
#endif
}

// One image's chain: which ops run and their values, in the arithmetic type A.
template <typename A>
struct Chain {
  bool bright, sat, con, crop, cutout, flip, scale, rotate;
  A add, sat_f, con_f;
  int64_t crop_y, crop_x, hole_y0, hole_y1, hole_x0, hole_x1;
  A sx, sy, cos_a, sin_a;
  int64_t H, W;

  // v: the image's row of kNumColumns values, converted to A; cutout_h, cutout_w: the hole's size
  LTDD_HD Chain(const int32_t* flags, const A* v, int64_t H_, int64_t W_, int64_t cutout_h, int64_t cutout_w)
      : bright(flags[kBrightness] != 0), sat(flags[kSaturation] != 0), con(flags[kContrast] != 0),
        crop(flags[kCrop] != 0), cutout(flags[kCutout] != 0), flip(false), scale(flags[kScale] != 0),
        rotate(flags[kRotate] != 0), add(bright ? v[kAdd] : A(0)), sat_f(sat ? v[kSat] : A(1)),
        con_f(con ? v[kCon] : A(1)), crop_y(0), crop_x(0), hole_y0(0), hole_y1(0), hole_x0(0), hole_x1(0),
        sx(A(1)), sy(A(1)), cos_a(A(1)), sin_a(A(0)), H(H_), W(W_) {
    if (crop) {
      crop_y = static_cast<int64_t>(v[kCropY]);
      crop_x = static_cast<int64_t>(v[kCropX]);
    }
    if (cutout) {  // dsa_chain.cutout: rows [cy - h // 2, cy - h // 2 + h), likewise the columns
      hole_y0 = static_cast<int64_t>(v[kCutY]) - cutout_h / 2;
      hole_x0 = static_cast<int64_t>(v[kCutX]) - cutout_w / 2;
      hole_y1 = hole_y0 + cutout_h;
      hole_x1 = hole_x0 + cutout_w;
    }
    flip = flags[kFlip] != 0 && v[kFlipOn] != A(0);
    if (scale) {
      sx = v[kScaleX];
      sy = v[kScaleY];
    }
    if (rotate) cos_sin(v[kDegrees] * A(3.14159265358979323846 / 180.0), &cos_a, &sin_a);
  }

  LTDD_HD bool colour() const { return bright || sat || con; }
  LTDD_HD bool spatial() const { return crop || cutout || flip || scale || rotate; }

  // torch.linspace(-1, 1, n)[k], computed as linspace does (affine_grid's base grid); 0 when n == 1
  static LTDD_HD A grid_coord(int64_t k, int64_t n) {
    if (n <= 1) return A(0);
    const A step = A(2) / static_cast<A>(n - 1);
    return k < n / 2 ? A(-1) + step * static_cast<A>(k) : A(1) - step * static_cast<A>(n - 1 - k);
  }

  // grid_sample (bilinear, align_corners=True, zero padding) at the normalised point (gx, gy): the in-bounds
  // taps among its 4 neighbours, as (row, column, weight); returns how many
  LTDD_HD int bilinear(A gx, A gy, int64_t* ys, int64_t* xs, A* ws) const {
    A ix = ((gx + A(1)) / A(2)) * static_cast<A>(W - 1);
    A iy = ((gy + A(1)) / A(2)) * static_cast<A>(H - 1);
    // keep the integer conversion defined for any value: a point this far out has no tap inside anyway
    ix = ix < A(-2) ? A(-2) : (ix > static_cast<A>(W + 1) ? static_cast<A>(W + 1) : ix);
    iy = iy < A(-2) ? A(-2) : (iy > static_cast<A>(H + 1) ? static_cast<A>(H + 1) : iy);
    const A fx = floor_of(ix), fy = floor_of(iy);
    const int64_t x0 = static_cast<int64_t>(fx), y0 = static_cast<int64_t>(fy);
    const A east = ix - fx, south = iy - fy;  // weights of the column x0 + 1 and the row y0 + 1
    int n = 0;
    for (int dy = 0; dy < 2; ++dy) {
      const int64_t y = y0 + dy;
      if (y < 0 || y >= H) continue;
      for (int dx = 0; dx < 2; ++dx) {
        const int64_t x = x0 + dx;
        if (x < 0 || x >= W) continue;
        ys[n] = y;
        xs[n] = x;
        ws[n] = (dx ? east : A(1) - east) * (dy ? south : A(1) - south);
        ++n;
      }
    }
    return n;
  }

  // The pixels of the colour-adjusted image (flat index y * W + x) that output pixel (i, j) of the chain reads,
  // with their weights; returns how many (at most kMaxTaps, 0 where it is zero-filled or cut out)
  LTDD_HD int taps(int64_t i, int64_t j, int64_t* q, A* w) const {
    int64_t ys1[4], xs1[4], ys2[4], xs2[4];
    A ws1[4], ws2[4];
    int n1 = 1;
    ys1[0] = i;
    xs1[0] = j;
    ws1[0] = A(1);
    if (rotate) {  // theta = [[cos, sin, 0], [-sin, cos, 0]]
      const A xn = grid_coord(j, W), yn = grid_coord(i, H);
      n1 = bilinear(cos_a * xn + sin_a * yn, -sin_a * xn + cos_a * yn, ys1, xs1, ws1);
    }
    int count = 0;
    for (int a = 0; a < n1; ++a) {
      int n2 = 1;
      ys2[0] = ys1[a];
      xs2[0] = xs1[a];
      ws2[0] = A(1);
      if (scale)  // theta = [[sx, 0, 0], [0, sy, 0]]
        n2 = bilinear(sx * grid_coord(xs1[a], W), sy * grid_coord(ys1[a], H), ys2, xs2, ws2);
      for (int b = 0; b < n2; ++b) {
        int64_t y = ys2[b], x = xs2[b];
        if (flip) x = W - 1 - x;
        if (cutout && y >= hole_y0 && y < hole_y1 && x >= hole_x0 && x < hole_x1) continue;
        if (crop) {
          y -= crop_y;
          x -= crop_x;
          if (y < 0 || y >= H || x < 0 || x >= W) continue;
        }
        q[count] = y * W + x;
        w[count] = ws1[a] * ws2[b];
        ++count;
      }
    }
    return count;
  }

  // Colour, forward, of one channel value x of a pixel whose brightened channel mean is m (mean_c x + add),
  // with `mean` the image's mean after saturation (contrast's centre)
  LTDD_HD A colour_forward(A x, A m, A mean) const {
    A y = x + add;
    if (sat) y = (y - m) * sat_f + m;
    if (con) y = (y - mean) * con_f + mean;
    return y;
  }

  // Colour, transposed, of one channel value g of a pixel whose channel sum is g_sum, with k = (1 - con_f) *
  // (the image's sum of g) / (its number of values), 0 without contrast: contrast^T then saturation^T
  LTDD_HD A colour_transpose(A g, A g_sum, int64_t C, A k) const {
    const A t = con_f * g + k;
    if (!sat) return t;
    return sat_f * t + (A(1) - sat_f) * (con_f * g_sum + static_cast<A>(C) * k) / static_cast<A>(C);
  }
  LTDD_HD A contrast_k(A total, int64_t n) const { return con ? (A(1) - con_f) * total / static_cast<A>(n) : A(0); }
};

}  // namespace dsa
}  // namespace ltdd_fast
