// The argument checks of ltdd_fast::dsa, shared by its CPU kernel (csrc/cpu/dsa.cpp) and its CUDA one
// (csrc/cuda/bindings.cpp); the per-pixel arithmetic is dsa_chain.h's, which includes no torch header.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "dsa_chain.h"

namespace ltdd_fast {
namespace dsa {

// x [B, C, H, W] floating; values [B, kNumColumns] of x's dtype, one row of draws per image; flags int32
// [kNumOps]; all three on x's device; a cutout of a non-negative size
inline void check_args(const at::Tensor& x, const at::Tensor& values, const at::Tensor& flags, int64_t cutout_h,
                       int64_t cutout_w) {
  TORCH_CHECK(x.dim() == 4, "dsa: x must be [B, C, H, W], got ", x.sizes());
  TORCH_CHECK(x.is_floating_point(), "dsa: x must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
  const int64_t B = x.size(0);
  TORCH_CHECK(values.dim() == 2 && values.size(0) == B && values.size(1) == kNumColumns &&
                  values.scalar_type() == x.scalar_type(),
              "dsa: values must be ", x.scalar_type(), " [", B, ", ", kNumColumns, "] (one row of draws per image), got ",
              values.scalar_type(), " ", values.sizes());
  TORCH_CHECK(flags.dim() == 1 && flags.size(0) == kNumOps && flags.scalar_type() == at::kInt,
              "dsa: flags must be int32 [", kNumOps, "] (one per op), got ", flags.scalar_type(), " ", flags.sizes());
  TORCH_CHECK(values.device() == x.device() && flags.device() == x.device(), "dsa: values and flags must be on ",
              x.device(), " (x's device), got ", values.device(), " and ", flags.device());
  TORCH_CHECK(cutout_h >= 0 && cutout_w >= 0, "dsa: the cutout size must not be negative, got ", cutout_h, "x",
              cutout_w);
}

}  // namespace dsa
}  // namespace ltdd_fast
