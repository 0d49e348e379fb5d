// Operator schemas of the ltdd_fast library. Kernels register per device in csrc/cpu and csrc/cuda;
// fake (meta) kernels and autograd formulas are registered from Python (ltdd_fast/ops.py).
#include <torch/extension.h>

TORCH_LIBRARY(ltdd_fast, m) {
  // One student step on the flat parameter vector, out of place:
  //   g' = grad with [frozen_start, frozen_end) zeroed,
  //   theta_next = theta - alpha * g',  grad_sum_next = grad_sum + g'.
  // alpha is a 0-d tensor so that it can be learned.
  m.def("student_sgd_step(Tensor theta, Tensor grad, Tensor grad_sum, Tensor alpha, int frozen_start, int frozen_end) -> (Tensor, Tensor)");
}

// `import ltdd_fast._C` loads this library, which runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ltdd_fast native operators (registered under torch.ops.ltdd_fast)";
}
