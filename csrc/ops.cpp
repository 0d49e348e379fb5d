// Operator schemas of the ltdd_fast library. Kernels register per device in csrc/cpu and csrc/cuda;
// fake (meta) kernels and autograd formulas are registered from Python (ltdd_fast/ops/, one module per operator).
#include <torch/extension.h>

TORCH_LIBRARY(ltdd_fast, m) {
  // One student step on the flat parameter vector, out of place:
  //   g' = grad with [frozen_start, frozen_end) zeroed,
  //   theta_next = theta - alpha * g',  grad_sum_next = grad_sum + g'.
  // alpha is a 0-d tensor so that it can be learned.
  m.def("student_sgd_step(Tensor theta, Tensor grad, Tensor grad_sum, Tensor alpha, int frozen_start, int frozen_end) -> (Tensor, Tensor)");
  // The normalised parameter distance of METHOD section 6 over a mask m (None = all parameters), with
  // theta_N = theta_0 - alpha * grad_sum:
  //   D = ||m (theta_0 - theta_T)||^2,  loss = ||m (theta_N - theta_T)||^2 / D,
  //   v = 2 m (alpha (theta_T - theta_0) + alpha^2 grad_sum) / D  (= d loss / d grad_sum),
  //   d_alpha = -2 grad_sum . (m (theta_N - theta_T)) / D.
  // Returns (loss [], v [P], d_alpha []).
  m.def("param_distance(Tensor theta_0, Tensor theta_T, Tensor grad_sum, Tensor alpha, Tensor? mask) -> (Tensor, Tensor, Tensor)");
  // Class-weighted soft-label cross-entropy (the DAM loss) with its gradients and per-class statistics:
  //   p = softmax(target_logits), q = softmax(logits), w = class_weights (None = 1),
  //   loss = (1/B) sum_i sum_c w_c p_ic (-log q_ic).
  // classes [B] (int64) is the class each row belongs to, for the statistics.
  // Returns (loss [], grad_logits [B,C], grad_target [B,C], class_loss_sum [K], class_count [K],
  //          class_grad_norm [K]) with K = num_classes: summed per-row loss, rows, and the L2 norm of the
  //          logit gradient over each class's rows (sqrt of the summed squares).
  m.def("soft_ce_stats(Tensor logits, Tensor target_logits, Tensor? class_weights, Tensor classes, int num_classes) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Per-class statistics of per-image gradient L2 norms: grads [N, ...] flattened per image, classes [N].
  // Returns (norm_sum [K], norm_max [K]); an empty class gives 0 for both.
  m.def("class_grad_stats(Tensor grads, Tensor classes, int num_classes) -> (Tensor, Tensor)");
  // target[index[i]] += src[i] for every row i (repeated indices accumulate), in place: the scatter of one
  // step's image or label gradients into the synthetic set's gradient.
  m.def("scatter_add_rows_(Tensor(a!) target, Tensor index, Tensor src) -> ()");
  // The DSA chain of one call (ltdd_fast/augment.py; arithmetic in csrc/dsa_chain.h) on x [B, C, H, W], or with
  // transpose its transpose (the chain is linear in the image but for brightness's constant, which the transpose
  // drops): values [B, 11] (x's dtype) are each image's draws, flags [8] (int32) say which ops run, cutout_h and
  // cutout_w are the cutout hole's size. Returns a new tensor of x's shape.
  m.def("dsa(Tensor x, Tensor values, Tensor flags, int cutout_h, int cutout_w, bool transpose) -> Tensor");
  // Per-class batch-norm statistics of features [N, C, *spatial] (spatial may be empty), classes [N] in [0, K):
  //   count[k] = (images of class k) * prod(spatial),
  //   sum[k, c] = sum over those images n and positions of features[n, c, ...], sumsq[k, c] the same of squares.
  // Returns (count [K], sum [K, C], sumsq [K, C]) in the accumulation type (double for double, float otherwise);
  // an empty class gives 0. Each (class, channel) adds its images in image order: bit-identical run to run.
  m.def("class_feature_stats(Tensor features, Tensor classes, int num_classes) -> (Tensor, Tensor, Tensor)");
}

// `import ltdd_fast._C` loads this library, which runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ltdd_fast native operators (registered under torch.ops.ltdd_fast)";
}
