"""ltdd_fast: long-tailed dataset distillation with fused kernels.

Data flows one way: data -> experts -> distill -> evaluate (and hierarchy's two-stage classifiers); bench and cli
sit on top. Each module imports only from the layers below it (tests/test_architecture.py holds the package to
this and to having no import cycle, lazy imports included):

    leaves        errors, checks, files, distributed (torchrun's process group), dam (DAM's loss and weights),
                  dsa_chain (DSA's transforms and packed format), phases (one phase's matching problem), plots
    kernels/      the Triton kernels (torch and Triton only)
    ops/          the fused operators: per operator its checks, reference, fake, autograd and dispatch
    models/, augment, data/, synset, trajectories, reference (the whole matching step in plain PyTorch)
    config        DistillConfig and its one validator, UnilevelConfig
    matching/     the constant-memory matching gradient on the operators; memory (its planner)
    calibration   ADSA's soft-label calibration
    experts, evaluate, distill, hierarchy/ (groupings, two-stage classification), unilevel/ (the second distiller)
    bench/, demo, cli/
"""
import os

import torch

__version__ = "0.1.0"

# Without a GPU, Triton runs kernels only in its interpreter, a mode it fixes when it is first imported, by
# ltdd_fast.kernels or by torch itself (which imports it lazily, e.g. during training). So it is chosen here,
# before anything can import Triton. TRITON_INTERPRET set by the user is left alone.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
