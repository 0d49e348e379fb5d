// Host launchers of the ltdd_fast CUDA kernels: raw device pointers, sizes and a stream, no torch types, so
// that every .cu file compiles with nvcc alone (CI without a CUDA torch) and bindings.cpp is the only place
// that knows about tensors. Each launcher is instantiated for float, double, __half and __nv_bfloat16; the
// low-precision types accumulate in float (acc_t). A launcher only enqueues work on `stream` and never
// synchronises; it returns the launch status (cudaGetLastError()).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace ltdd_fast {
namespace cuda {

template <typename T>
struct acc_type {
  using type = float;
};
template <>
struct acc_type<double> {
  using type = double;
};
// the type every sum, softmax and scalar (alpha) is computed in: double for double, float otherwise
template <typename T>
using acc_t = typename acc_type<T>::type;

// g' = grad with [frozen_start, frozen_end) zeroed; theta_next = theta - alpha * g'; grad_sum_next = grad_sum + g'.
// alpha: one value on the device.
template <typename T>
cudaError_t student_sgd_step(const T* theta, const T* grad, const T* grad_sum, const acc_t<T>* alpha, int64_t n,
                             int64_t frozen_start, int64_t frozen_end, T* theta_next, T* grad_sum_next,
                             cudaStream_t stream);

// Normalised parameter distance over a mask (see csrc/ops.cpp). At most one of mask_bool / mask_value is
// non-null (neither = all parameters); a value mask m weighs every squared term by m^2, so v and d_alpha stay
// the exact derivatives of loss (2 m^2 (...) / D, equal to 2 m (...) / D for a 0/1 mask).
// workspace: param_distance_workspace_elems(n) elements of acc_t<T>, uninitialised.
int64_t param_distance_workspace_elems(int64_t n);
template <typename T>
cudaError_t param_distance(const T* theta_0, const T* theta_T, const T* grad_sum, const acc_t<T>* alpha,
                           const bool* mask_bool, const T* mask_value, int64_t n, acc_t<T>* workspace, T* loss,
                           T* v, T* d_alpha, cudaStream_t stream);

// Class-weighted soft-label cross-entropy with gradients and per-class statistics (see csrc/ops.cpp).
// logits, target_logits, grad_logits, grad_target: [B, C] contiguous; class_weights: [C] or null (= 1);
// classes: [B] in [0, K) (a row outside is skipped, with a device assert in debug builds).
// workspace: soft_ce_stats_workspace_elems(B, K) elements of acc_t<T>, uninitialised.
int64_t soft_ce_stats_workspace_elems(int64_t B, int64_t K);
template <typename T>
cudaError_t soft_ce_stats(const T* logits, const T* target_logits, const acc_t<T>* class_weights,
                          const int64_t* classes, int64_t B, int64_t C, int64_t K, acc_t<T>* workspace, T* loss,
                          T* grad_logits, T* grad_target, T* class_loss_sum, int64_t* class_count,
                          T* class_grad_norm, cudaStream_t stream);

// Per-class sum and max of per-image L2 norms: grads [N, D] contiguous, classes [N] in [0, K).
// Outputs [K]; an empty class gives 0 for both. workspace: class_grad_stats_workspace_elems(N, D, K) elements.
int64_t class_grad_stats_workspace_elems(int64_t N, int64_t D, int64_t K);
template <typename T>
cudaError_t class_grad_stats(const T* grads, const int64_t* classes, int64_t N, int64_t D, int64_t K,
                             acc_t<T>* workspace, T* norm_sum, T* norm_max, cudaStream_t stream);

// Per-class count, sum and sum of squares of features [N, C, P] contiguous (P the product of the spatial sizes) per
// channel, classes [N] in [0, K) (an image outside is left out, with a device assert in debug builds). Outputs in
// acc_t<T>: count [K] (images times P), sum and sumsq [K, C]; an empty class gives 0. Deterministic (no atomics).
// workspace: class_feature_stats_workspace_elems(N, C) elements, uninitialised.
int64_t class_feature_stats_workspace_elems(int64_t N, int64_t C);
template <typename T>
cudaError_t class_feature_stats(const T* features, const int64_t* classes, int64_t N, int64_t C, int64_t P,
                                int64_t K, acc_t<T>* workspace, acc_t<T>* count, acc_t<T>* sum, acc_t<T>* sumsq,
                                cudaStream_t stream);

// target[index[i], :] += src[i, :] for i < N (atomics: repeated indices accumulate). target: [M, D] contiguous,
// src: [N, D] contiguous, index in [0, M) (a row outside is skipped, with a device assert in debug builds).
template <typename T>
cudaError_t scatter_add_rows(T* target, const int64_t* index, const T* src, int64_t N, int64_t D, int64_t M,
                             cudaStream_t stream);

// The DSA chain of one call (csrc/dsa_chain.h) on each image of x [B, C, H, W] contiguous, or with transpose its
// transpose: values [B, 11] (one row of draws per image) and flags [8] (the ops that run), both on the device.
// workspace: dsa_workspace_elems(...) elements of acc_t<T> (the transpose's scatter target), uninitialised.
int64_t dsa_workspace_elems(int64_t B, int64_t C, int64_t H, int64_t W, bool transpose);
template <typename T>
cudaError_t dsa(const T* x, const T* values, const int32_t* flags, int64_t B, int64_t C, int64_t H, int64_t W,
                int64_t cutout_h, int64_t cutout_w, bool transpose, acc_t<T>* workspace, T* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace ltdd_fast
