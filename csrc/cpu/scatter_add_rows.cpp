// CPU kernel of ltdd_fast::scatter_add_rows_: target[index[i]] += src[i], in place. Threads split the columns, not
// the rows, so repeated indices never race and every element accumulates its rows in order (deterministic).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

namespace {

void scatter_add_rows_cpu(const at::Tensor& target, const at::Tensor& index, const at::Tensor& src) {
  TORCH_CHECK(target.dim() >= 1, "scatter_add_rows_: target must be [M, ...], got a 0-d tensor");
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong, "scatter_add_rows_: index must be 1-D int64, got ",
              index.scalar_type(), " ", index.sizes());
  TORCH_CHECK(src.dim() == target.dim() && src.size(0) == index.size(0) &&
                  src.sizes().slice(1) == target.sizes().slice(1),
              "scatter_add_rows_: src must be [", index.size(0), ", ", target.sizes().slice(1), "], got ",
              src.sizes());
  TORCH_CHECK(src.scalar_type() == target.scalar_type(), "scatter_add_rows_: src must have target's dtype ",
              target.scalar_type(), ", got ", src.scalar_type());
  auto idx = index.contiguous();
  const int64_t n = idx.numel(), rows = target.size(0);
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)  // all indices checked before target is touched: no partial update
    TORCH_CHECK(ip[i] >= 0 && ip[i] < rows, "scatter_add_rows_: index[", i, "] = ", ip[i], " is outside [0, ",
                rows, ")");
  if (n == 0 || target.numel() == 0) return;
  auto s = src.contiguous();
  // A non-contiguous target is updated through a contiguous copy, written back at the end.
  at::Tensor out = target.is_contiguous() ? target : target.contiguous();
  {  // src sharing memory with target is read from a copy (the reference reads src before any update), so the
     // vectorised row update below never sees an aliased row
    const auto* sb = static_cast<const char*>(s.const_data_ptr());
    const auto* ob = static_cast<const char*>(out.const_data_ptr());
    if (sb < ob + out.nbytes() && ob < sb + s.nbytes()) s = s.clone();
  }
  const int64_t width = out.numel() / rows;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "scatter_add_rows_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, (1 << 15) / n);
    at::parallel_for(0, width, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = 0; i < n; ++i) {
        scalar_t* dst = op + ip[i] * width;
        const scalar_t* row = sp + i * width;
        _Pragma("omp simd")  // src never overlaps target (copied above if it did)
        for (int64_t j = begin; j < end; ++j)
          dst[j] = static_cast<scalar_t>(static_cast<opmath_t>(dst[j]) + static_cast<opmath_t>(row[j]));
      }
    });
  });
  if (!out.is_same(target)) target.copy_(out);
}

}  // namespace

TORCH_LIBRARY_IMPL(ltdd_fast, CPU, m) {
  m.impl("scatter_add_rows_", &scatter_add_rows_cpu);
}
