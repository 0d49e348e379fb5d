// CUDA kernels of the ltdd_fast operators (schemas in csrc/ops.cpp), built only WITH_CUDA: input checks, output
// allocation, the current stream and dtype dispatch; the kernels themselves live in csrc/cuda/*.cu behind the
// torch-free launchers of launchers.h. Nothing here copies a device value to the host (alpha stays on the
// device), so no operator synchronises the stream.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include <optional>
#include <tuple>

#include "../dsa_args.h"
#include "launchers.h"

namespace {

namespace lc = ltdd_fast::cuda;

// torch's element types and the CUDA types the launchers are instantiated for share one layout
template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};
template <typename scalar_t>
using cuda_t = typename CudaType<scalar_t>::type;
template <typename scalar_t>
using acc_of = lc::acc_t<cuda_t<scalar_t>>;

template <typename scalar_t>
const cuda_t<scalar_t>* in_ptr(const at::Tensor& t) {
  return reinterpret_cast<const cuda_t<scalar_t>*>(t.const_data_ptr<scalar_t>());
}
template <typename scalar_t>
cuda_t<scalar_t>* out_ptr(const at::Tensor& t) {
  return reinterpret_cast<cuda_t<scalar_t>*>(t.mutable_data_ptr<scalar_t>());
}

// the dtype of the kernels' accumulation and of alpha on the device: double for double, float otherwise
at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_on(const at::Tensor& t, const at::Device& device, const char* op, const char* name) {
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, " (the device of the other inputs), got ",
              t.device());
}

void check_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

// alpha is read by the kernels from device memory, so an alpha on the inputs' device (the learned one) never
// costs a host sync; a CPU alpha is accepted too, at the price of a host-to-device copy
at::Tensor alpha_on_device(const at::Tensor& alpha, const at::Tensor& like, const char* op) {
  TORCH_CHECK(alpha.numel() == 1, op, ": alpha must hold one value, got ", alpha.numel());
  TORCH_CHECK(alpha.device() == like.device() || alpha.device().is_cpu(), op, ": alpha must be on ", like.device(),
              " or the CPU, got ", alpha.device());
  TORCH_CHECK(at::isFloatingType(alpha.scalar_type()), op, ": alpha must be floating point, got ",
              alpha.scalar_type());
  return alpha.reshape({}).to(like.device(), acc_dtype(like.scalar_type())).contiguous();
}

// ---- student_sgd_step ---------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> student_sgd_step_cuda(const at::Tensor& theta, const at::Tensor& grad,
                                                         const at::Tensor& grad_sum, const at::Tensor& alpha,
                                                         int64_t frozen_start, int64_t frozen_end) {
  constexpr const char* op = "student_sgd_step";
  TORCH_CHECK(theta.is_cuda(), op, ": theta must be a CUDA tensor, got ", theta.device());
  TORCH_CHECK(theta.dim() == 1, "student_sgd_step: theta must be 1-D, got ", theta.dim(), "-D");
  TORCH_CHECK(grad.sizes() == theta.sizes() && grad_sum.sizes() == theta.sizes(),
              "student_sgd_step: grad and grad_sum must have theta's shape ", theta.sizes());
  TORCH_CHECK(grad.scalar_type() == theta.scalar_type() && grad_sum.scalar_type() == theta.scalar_type(),
              "student_sgd_step: theta, grad and grad_sum must share one dtype");
  check_floating(theta, op, "theta");
  check_on(grad, theta.device(), op, "grad");
  check_on(grad_sum, theta.device(), op, "grad_sum");
  TORCH_CHECK(0 <= frozen_start && frozen_start <= frozen_end && frozen_end <= theta.numel(),
              "student_sgd_step: frozen range [", frozen_start, ", ", frozen_end, ") must lie in [0, ",
              theta.numel(), "]");

  const c10::cuda::CUDAGuard guard(theta.device());
  const at::Tensor a = alpha_on_device(alpha, theta, op);
  const at::Tensor t = theta.contiguous();
  const at::Tensor g = grad.contiguous();
  const at::Tensor s = grad_sum.contiguous();
  at::Tensor theta_next = at::empty(t.sizes(), t.options());
  at::Tensor sum_next = at::empty(s.sizes(), s.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "student_sgd_step_cuda", [&] {
    C10_CUDA_CHECK(lc::student_sgd_step(in_ptr<scalar_t>(t), in_ptr<scalar_t>(g), in_ptr<scalar_t>(s),
                                        a.const_data_ptr<acc_of<scalar_t>>(), t.numel(), frozen_start, frozen_end,
                                        out_ptr<scalar_t>(theta_next), out_ptr<scalar_t>(sum_next), stream));
  });
  return {theta_next, sum_next};
}

// ---- param_distance -----------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> param_distance_cuda(const at::Tensor& theta_0,
                                                                   const at::Tensor& theta_T,
                                                                   const at::Tensor& grad_sum,
                                                                   const at::Tensor& alpha,
                                                                   const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "param_distance";
  TORCH_CHECK(theta_0.is_cuda(), op, ": theta_0 must be a CUDA tensor, got ", theta_0.device());
  TORCH_CHECK(theta_0.dim() == 1, "param_distance: theta_0 must be 1-D, got ", theta_0.dim(), "-D");
  TORCH_CHECK(theta_T.sizes() == theta_0.sizes() && grad_sum.sizes() == theta_0.sizes(),
              "param_distance: theta_T and grad_sum must have theta_0's shape ", theta_0.sizes(), ", got ",
              theta_T.sizes(), " and ", grad_sum.sizes());
  TORCH_CHECK(theta_T.scalar_type() == theta_0.scalar_type() && grad_sum.scalar_type() == theta_0.scalar_type(),
              "param_distance: theta_0, theta_T and grad_sum must share one dtype");
  check_floating(theta_0, op, "theta_0");
  check_on(theta_T, theta_0.device(), op, "theta_T");
  check_on(grad_sum, theta_0.device(), op, "grad_sum");
  const bool has_mask = mask.has_value() && mask->defined();
  if (has_mask) {
    TORCH_CHECK(mask->sizes() == theta_0.sizes(), "param_distance: mask must have theta_0's shape ",
                theta_0.sizes(), ", got ", mask->sizes());
    TORCH_CHECK(mask->scalar_type() == at::kBool || at::isFloatingType(mask->scalar_type()),
                "param_distance: mask must be bool or floating point, got ", mask->scalar_type());
    check_on(*mask, theta_0.device(), op, "mask");
  }

  const c10::cuda::CUDAGuard guard(theta_0.device());
  const at::Tensor a = alpha_on_device(alpha, theta_0, op);
  const at::Tensor t0 = theta_0.contiguous();
  const at::Tensor tT = theta_T.contiguous();
  const at::Tensor gs = grad_sum.contiguous();
  const bool bool_mask = has_mask && mask->scalar_type() == at::kBool;
  // a value mask is read in theta's dtype
  const at::Tensor m = !has_mask ? at::Tensor()
                       : bool_mask ? mask->contiguous()
                                   : mask->to(t0.scalar_type()).contiguous();
  const int64_t n = t0.numel();
  at::Tensor loss = at::empty({}, t0.options());
  at::Tensor v = at::empty(t0.sizes(), t0.options());
  at::Tensor d_alpha = at::empty({}, t0.options());
  at::Tensor workspace =
      at::empty({lc::param_distance_workspace_elems(n)}, t0.options().dtype(acc_dtype(t0.scalar_type())));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t0.scalar_type(), "param_distance_cuda", [&] {
    const bool* mask_bool = bool_mask ? m.const_data_ptr<bool>() : nullptr;
    const cuda_t<scalar_t>* mask_value = (has_mask && !bool_mask) ? in_ptr<scalar_t>(m) : nullptr;
    C10_CUDA_CHECK(lc::param_distance(in_ptr<scalar_t>(t0), in_ptr<scalar_t>(tT), in_ptr<scalar_t>(gs),
                                      a.const_data_ptr<acc_of<scalar_t>>(), mask_bool, mask_value, n,
                                      workspace.mutable_data_ptr<acc_of<scalar_t>>(), out_ptr<scalar_t>(loss),
                                      out_ptr<scalar_t>(v), out_ptr<scalar_t>(d_alpha), stream));
  });
  return {loss, v, d_alpha};
}

// ---- soft_ce_stats ------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_ce_stats_cuda(
    const at::Tensor& logits, const at::Tensor& target_logits, const std::optional<at::Tensor>& class_weights,
    const at::Tensor& classes, int64_t num_classes) {
  constexpr const char* op = "soft_ce_stats";
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() == 2, "soft_ce_stats: logits must be 2-D [B, C], got ", logits.dim(), "-D");
  TORCH_CHECK(logits.size(0) > 0 && logits.size(1) > 0, "soft_ce_stats: logits must have at least one row and ",
              "one column, got shape ", logits.sizes());
  TORCH_CHECK(target_logits.sizes() == logits.sizes(), "soft_ce_stats: target_logits must have logits' shape ",
              logits.sizes(), ", got ", target_logits.sizes());
  TORCH_CHECK(target_logits.scalar_type() == logits.scalar_type(),
              "soft_ce_stats: logits and target_logits must share one dtype, got ", logits.scalar_type(), " and ",
              target_logits.scalar_type());
  check_floating(logits, op, "logits");
  check_on(target_logits, logits.device(), op, "target_logits");
  const int64_t B = logits.size(0), C = logits.size(1);
  const bool has_weights = class_weights.has_value() && class_weights->defined();
  if (has_weights) {
    TORCH_CHECK(class_weights->dim() == 1 && class_weights->size(0) == C,
                "soft_ce_stats: class_weights must have shape [", C, "] (one per logit column), got ",
                class_weights->sizes());
    check_floating(*class_weights, op, "class_weights");
    check_on(*class_weights, logits.device(), op, "class_weights");
  }
  TORCH_CHECK(classes.dim() == 1 && classes.size(0) == B, "soft_ce_stats: classes must have shape [", B,
              "] (one per row of logits), got ", classes.sizes());
  TORCH_CHECK(classes.scalar_type() == at::kLong, "soft_ce_stats: classes must be int64, got ",
              classes.scalar_type());
  check_on(classes, logits.device(), op, "classes");
  TORCH_CHECK(num_classes >= 1, "soft_ce_stats: num_classes must be at least 1, got ", num_classes);

  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor z = logits.contiguous();
  const at::Tensor y = target_logits.contiguous();
  const at::Tensor k = classes.contiguous();
  const at::ScalarType acc = acc_dtype(z.scalar_type());
  // the weights take the logits' dtype first, as the reference's class_weights.to(per_class) does (and the CPU
  // kernel), then the accumulation type the kernel reads
  const at::Tensor w = has_weights ? class_weights->to(z.scalar_type()).to(acc).contiguous() : at::Tensor();
  const int64_t K = num_classes;
  at::Tensor loss = at::empty({}, z.options());
  at::Tensor grad_logits = at::empty({B, C}, z.options());
  at::Tensor grad_target = at::empty({B, C}, z.options());
  at::Tensor class_loss_sum = at::empty({K}, z.options());
  at::Tensor class_count = at::empty({K}, z.options().dtype(at::kLong));
  at::Tensor class_grad_norm = at::empty({K}, z.options());
  at::Tensor workspace = at::empty({lc::soft_ce_stats_workspace_elems(B, K)}, z.options().dtype(acc));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "soft_ce_stats_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    const acc_t* weights = has_weights ? w.const_data_ptr<acc_t>() : nullptr;
    C10_CUDA_CHECK(lc::soft_ce_stats(in_ptr<scalar_t>(z), in_ptr<scalar_t>(y), weights, k.const_data_ptr<int64_t>(),
                                     B, C, K, workspace.mutable_data_ptr<acc_t>(), out_ptr<scalar_t>(loss),
                                     out_ptr<scalar_t>(grad_logits), out_ptr<scalar_t>(grad_target),
                                     out_ptr<scalar_t>(class_loss_sum), class_count.mutable_data_ptr<int64_t>(),
                                     out_ptr<scalar_t>(class_grad_norm), stream));
  });
  return {loss, grad_logits, grad_target, class_loss_sum, class_count, class_grad_norm};
}

// ---- class_grad_stats ---------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> class_grad_stats_cuda(const at::Tensor& grads, const at::Tensor& classes,
                                                         int64_t num_classes) {
  constexpr const char* op = "class_grad_stats";
  TORCH_CHECK(grads.is_cuda(), op, ": grads must be a CUDA tensor, got ", grads.device());
  TORCH_CHECK(grads.dim() >= 1, "class_grad_stats: grads must be [N, ...] (one row per image), got a 0-D tensor");
  check_floating(grads, op, "grads");
  const int64_t N = grads.size(0);
  TORCH_CHECK(classes.dim() == 1 && classes.size(0) == N, "class_grad_stats: classes must have shape [", N,
              "] (one per image), got ", classes.sizes());
  TORCH_CHECK(classes.scalar_type() == at::kLong, "class_grad_stats: classes must be int64, got ",
              classes.scalar_type());
  check_on(classes, grads.device(), op, "classes");
  TORCH_CHECK(num_classes >= 1, "class_grad_stats: num_classes must be at least 1, got ", num_classes);

  const c10::cuda::CUDAGuard guard(grads.device());
  int64_t D = 1;  // values per image (not numel / N, which N = 0 would break)
  for (int64_t d = 1; d < grads.dim(); ++d) D *= grads.size(d);
  const int64_t K = num_classes;
  const at::Tensor g = grads.contiguous();
  const at::Tensor k = classes.contiguous();
  at::Tensor norm_sum = at::empty({K}, g.options());
  at::Tensor norm_max = at::empty({K}, g.options());
  at::Tensor workspace =
      at::empty({lc::class_grad_stats_workspace_elems(N, D, K)}, g.options().dtype(acc_dtype(g.scalar_type())));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "class_grad_stats_cuda", [&] {
    C10_CUDA_CHECK(lc::class_grad_stats(in_ptr<scalar_t>(g), k.const_data_ptr<int64_t>(), N, D, K,
                                        workspace.mutable_data_ptr<acc_of<scalar_t>>(), out_ptr<scalar_t>(norm_sum),
                                        out_ptr<scalar_t>(norm_max), stream));
  });
  return {norm_sum, norm_max};
}

// ---- class_feature_stats ------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> class_feature_stats_cuda(const at::Tensor& features,
                                                                        const at::Tensor& classes,
                                                                        int64_t num_classes) {
  constexpr const char* op = "class_feature_stats";
  TORCH_CHECK(features.is_cuda(), op, ": features must be a CUDA tensor, got ", features.device());
  TORCH_CHECK(features.dim() >= 2, "class_feature_stats: features must be [N, C, ...], got ", features.dim(),
              "-D");
  check_floating(features, op, "features");
  const int64_t N = features.size(0), C = features.size(1);
  TORCH_CHECK(classes.dim() == 1 && classes.size(0) == N, "class_feature_stats: classes must have shape [", N,
              "] (one per image), got ", classes.sizes());
  TORCH_CHECK(classes.scalar_type() == at::kLong, "class_feature_stats: classes must be int64, got ",
              classes.scalar_type());
  check_on(classes, features.device(), op, "classes");
  TORCH_CHECK(num_classes >= 1, "class_feature_stats: num_classes must be at least 1, got ", num_classes);

  const c10::cuda::CUDAGuard guard(features.device());
  int64_t P = 1;  // positions per (image, channel) plane
  for (int64_t d = 2; d < features.dim(); ++d) P *= features.size(d);
  const int64_t K = num_classes;
  const at::Tensor x = features.contiguous();
  const at::Tensor k = classes.contiguous();
  const auto acc = x.options().dtype(acc_dtype(x.scalar_type()));
  at::Tensor count = at::empty({K}, acc);
  at::Tensor sum = at::empty({K, C}, acc);
  at::Tensor sumsq = at::empty({K, C}, acc);
  at::Tensor workspace = at::empty({lc::class_feature_stats_workspace_elems(N, C)}, acc);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "class_feature_stats_cuda", [&] {
    using A = acc_of<scalar_t>;
    C10_CUDA_CHECK(lc::class_feature_stats(in_ptr<scalar_t>(x), k.const_data_ptr<int64_t>(), N, C, P, K,
                                           workspace.mutable_data_ptr<A>(), count.mutable_data_ptr<A>(),
                                           sum.mutable_data_ptr<A>(), sumsq.mutable_data_ptr<A>(), stream));
  });
  return {count, sum, sumsq};
}

// ---- scatter_add_rows_ --------------------------------------------------------------------------------------

void scatter_add_rows_cuda(const at::Tensor& target, const at::Tensor& index, const at::Tensor& src) {
  constexpr const char* op = "scatter_add_rows_";
  TORCH_CHECK(target.is_cuda(), op, ": target must be a CUDA tensor, got ", target.device());
  TORCH_CHECK(target.dim() >= 1, "scatter_add_rows_: target must be [M, ...], got a 0-D tensor");
  check_floating(target, op, "target");
  TORCH_CHECK(index.dim() == 1, "scatter_add_rows_: index must be 1-D, got ", index.dim(), "-D");
  TORCH_CHECK(index.scalar_type() == at::kLong, "scatter_add_rows_: index must be int64, got ", index.scalar_type());
  const int64_t N = index.size(0);
  TORCH_CHECK(src.dim() == target.dim() && src.size(0) == N && src.sizes().slice(1) == target.sizes().slice(1),
              "scatter_add_rows_: src must have shape [", N, "] + target.shape[1:] = [", N, ", ",
              target.sizes().slice(1), "], got ", src.sizes());
  TORCH_CHECK(src.scalar_type() == target.scalar_type(), "scatter_add_rows_: src must have target's dtype ",
              target.scalar_type(), ", got ", src.scalar_type());
  check_on(index, target.device(), op, "index");
  check_on(src, target.device(), op, "src");

  const c10::cuda::CUDAGuard guard(target.device());
  const int64_t M = target.size(0);
  int64_t D = 1;
  for (int64_t d = 1; d < target.dim(); ++d) D *= target.size(d);
  if (N == 0 || D == 0) return;
  const at::Tensor idx = index.contiguous();
  const at::Tensor s = src.contiguous();
  // a non-contiguous target is accumulated in a contiguous copy and written back
  at::Tensor t = target.is_contiguous() ? target : target.contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "scatter_add_rows_cuda", [&] {
    C10_CUDA_CHECK(lc::scatter_add_rows(out_ptr<scalar_t>(t), idx.const_data_ptr<int64_t>(), in_ptr<scalar_t>(s),
                                        N, D, M, stream));
  });
  if (!t.is_same(target)) target.copy_(t);
}

// ---- dsa ----------------------------------------------------------------------------------------------------

at::Tensor dsa_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& flags, int64_t cutout_h,
                    int64_t cutout_w, bool transpose) {
  constexpr const char* op = "dsa";
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
  ltdd_fast::dsa::check_args(x, values, flags, cutout_h, cutout_w);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(B <= 2147483647, "dsa: at most 2^31 - 1 images a call (one block each), got ", B);

  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor v = values.contiguous();
  const at::Tensor f = flags.contiguous();
  at::Tensor out = at::empty(xc.sizes(), xc.options());
  at::Tensor workspace = at::empty({lc::dsa_workspace_elems(B, C, H, W, transpose)},
                                   xc.options().dtype(acc_dtype(xc.scalar_type())));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "dsa_cuda", [&] {
    C10_CUDA_CHECK(lc::dsa(in_ptr<scalar_t>(xc), in_ptr<scalar_t>(v), f.const_data_ptr<int32_t>(), B, C, H, W,
                           cutout_h, cutout_w, transpose, workspace.mutable_data_ptr<acc_of<scalar_t>>(),
                           out_ptr<scalar_t>(out), stream));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ltdd_fast, CUDA, m) {
  m.impl("dsa", &dsa_cuda);
  m.impl("student_sgd_step", &student_sgd_step_cuda);
  m.impl("param_distance", &param_distance_cuda);
  m.impl("soft_ce_stats", &soft_ce_stats_cuda);
  m.impl("class_grad_stats", &class_grad_stats_cuda);
  m.impl("class_feature_stats", &class_feature_stats_cuda);
  m.impl("scatter_add_rows_", &scatter_add_rows_cuda);
}
