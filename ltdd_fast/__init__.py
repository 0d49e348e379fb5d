"""ltdd_fast: long-tailed dataset distillation with fused kernels."""
import os

import torch

__version__ = "0.1.0"

# Without a GPU, Triton runs kernels only in its interpreter, a mode it fixes when it is first imported, by
# ltdd_fast.kernels or by torch itself (which imports it lazily, e.g. during training). So it is chosen here,
# before anything can import Triton. TRITON_INTERPRET set by the user is left alone.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
