"""The constant-memory matching gradient on the fused operators: the fast twin of reference.two_pass_gradients.

Pass 1 unrolls the student on ops.soft_ce_stats and ops.student_sgd_step; ops.param_distance turns the end point
into L, v and dL/dalpha in one reduction. Pass 2 turns v into image and label gradients one step at a time: it
needs the mixed derivative d/dX (v . g_k), computed one of three ways (`second_pass`):
- "exact": reverse over reverse, as the reference (differentiate g_k, built with create_graph, once more);
- "forward": forward over reverse (torch.func.jvp of the first-order gradient along v): the same derivative up
  to floating-point reassociation. On a CPU it is slower than "exact" and holds more memory (dual tensors);
  it is here to be measured on other devices;
- "fd": central finite differences of the first-order image and label gradients at theta_k +/- h v, with a
  ConvNet's ReLU pattern held at theta_k's (second_pass.held_loss). First-order kernels only; an approximation whose
  cosine similarity to the exact gradients bench e2e reports (0.99999999 at CIFAR shapes in fp32).
Pass 2 scatters each step's batch gradients with ops.scatter_add_rows_ (native, or the reference: it has no Triton
twin). The network's blocks run on whatever backend was set on `net` (FunctionalNet.set_block_backend), except in
pass 2 of forward mode (it needs forward-mode derivatives, which only the PyTorch block has) and of fd mode (its
ReLU-pattern block).

compile: the same terms as pure torch.func functions of the step's tensors (second_pass.student_grad, exact_terms, fd_grads)
traced by torch.compile; the reverse-over-reverse exact term compiles too, as a function (torch.func.grad of
torch.func.grad) rather than as autograd.grad with create_graph. Each takes the gathered images and the step's
packed augmentation draws, and differentiates with respect to the augmented images u: the fused DSA chain runs
inside the graph, and so does its transpose, which maps d/du to the images (students.augment, augment_transpose).

Several students at once: given a list of K phases (K expert trajectories or start epochs, each with its own
minibatches and augmentation, all of one batch size), the K students advance together through
net.forward_students (K-grouped convolutions for a ConvNet) and the result is the mean of their K matching
gradients. K = 1 is the published method.

Memory: `chunk` splits every student minibatch into pieces of at most that many images whose gradients are
summed, so activation memory follows the chunk, not batch_syn (exact for per-sample normalisation; refused for a
network with batch statistics). `precision="bf16"` runs the student's network in bf16.

Modules: students (one phase's K students: pieces, augmentation, network call, compile cache), second_pass (the
four ways to the mixed derivative), gradients (the two passes and the iteration). May import: ops, dam, dsa_chain,
config (the options' one validator), reference (backend "reference" runs it), errors.
"""
from ..config import COMPILE_MODES, PRECISIONS, SECOND_PASSES
from .gradients import Options, iteration_gradients, two_pass_gradients
from .second_pass import FD_EPS

__all__ = ["COMPILE_MODES", "FD_EPS", "Options", "PRECISIONS", "SECOND_PASSES", "iteration_gradients",
           "two_pass_gradients"]
