"""PROTEUS Triton kernels, each beside the PyTorch reference that specifies it.

One op per file: ``leaky_relu2``, ``xsa_attention``, ``int6_matmul``, ``ngram_table``.
Importing this package picks how ``@triton.jit`` kernels run (see ``kernels._backend``):
compiled on a CUDA GPU, Triton's interpreter on a machine without one.
"""

from kernels._backend import configure as _configure

# Triton decides compiled-vs-interpreted when each @triton.jit decorator runs, so the
# choice has to be made before any kernel module body executes: that is why this one
# piece of set-up happens at import time.
_configure()
