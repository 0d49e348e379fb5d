// CPU kernel of ltdd_fast::soft_ce_stats: class-weighted soft-label cross-entropy (DAM), both logit gradients and
// per-class statistics in one sweep over the rows. Rows run in parallel; per-row results are combined in row
// order afterwards, so every output is independent of the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cmath>
#include <limits>
#include <vector>

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
    const scalar_t* wp = w.defined() ? w.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gz = grad_logits.mutable_data_ptr<scalar_t>();
    scalar_t* gt = grad_target.mutable_data_ptr<scalar_t>();
    const opmath_t inv_b = opmath_t(1) / static_cast<opmath_t>(B);
    // Enough rows per task that a task touches ~16k logits.
    const int64_t grain = std::max<int64_t>(1, (1 << 14) / C);
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      // exp(z - max z) and exp(t - max t) of one row, kept so each exponential is taken once
      std::vector<opmath_t> ez(C), et(C);
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* zr = zp + i * C;
        const scalar_t* tr = tp + i * C;
        opmath_t zmax = -std::numeric_limits<opmath_t>::infinity(), tmax = zmax;
        for (int64_t c = 0; c < C; ++c) {
          zmax = std::max(zmax, static_cast<opmath_t>(zr[c]));
          tmax = std::max(tmax, static_cast<opmath_t>(tr[c]));
        }
        // Row sums in double: at C = 1000 float sums of l lose ~1e-5 relative, which grad_target's (a_c - l) shows.
        double zsum = 0, tsum = 0;
        for (int64_t c = 0; c < C; ++c) {
          ez[c] = std::exp(static_cast<opmath_t>(zr[c]) - zmax);
          et[c] = std::exp(static_cast<opmath_t>(tr[c]) - tmax);
          zsum += ez[c];
          tsum += et[c];
        }
        const double lse_d = static_cast<double>(zmax) + std::log(zsum);  // -log q_c = lse - z_c
        const opmath_t lse = static_cast<opmath_t>(lse_d);
        const opmath_t inv_z = static_cast<opmath_t>(1.0 / zsum), inv_t = static_cast<opmath_t>(1.0 / tsum);
        // l = sum_c w_c p_c (lse - z_c), s = sum_c w_c p_c
        double l_d = 0, s_d = 0;
        for (int64_t c = 0; c < C; ++c) {
          const double wpc = (wp ? static_cast<double>(wp[c]) : 1.0) * et[c] / tsum;
          l_d += wpc * (lse_d - static_cast<double>(zr[c]));
          s_d += wpc;
        }
        const opmath_t l = static_cast<opmath_t>(l_d), s = static_cast<opmath_t>(s_d);
        // d loss / d z_c = (q_c s - w_c p_c) / B;  d loss / d t_c = p_c (w_c (lse - z_c) - l) / B
        double norm2 = 0;
        for (int64_t c = 0; c < C; ++c) {
          const opmath_t wc = wp ? static_cast<opmath_t>(wp[c]) : opmath_t(1);
          const opmath_t p = et[c] * inv_t;
          const opmath_t dz = (ez[c] * inv_z * s - wc * p) * inv_b;
          gz[i * C + c] = static_cast<scalar_t>(dz);
          gt[i * C + c] = static_cast<scalar_t>(p * (wc * (lse - static_cast<opmath_t>(zr[c])) - l) * inv_b);
          norm2 += static_cast<double>(dz) * dz;
        }
        row_loss[i] = l_d;
        row_norm2[i] = norm2;
      }
    });

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
