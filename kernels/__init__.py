"""PROTEUS Triton kernels, each beside the PyTorch reference that specifies it.

One op per file: ``leaky_relu2``, ``xsa_attention``, ``int6_matmul``, ``ngram_table``; their
public surface is re-exported here (``from proteus.kernels import xsa_attention``).

Import-time side effect (documented, and the only one): importing this package runs
``proteus.kernels._backend.configure()``, which decides how this process runs Triton kernels —
compiled on a CUDA GPU, Triton's interpreter on a machine without one (``TRITON_INTERPRET``
overrides; see ``_backend`` for exactly what it sets and patches). It must run before any
``@triton.jit`` decorator below, which is why it happens at import.
"""

from . import _backend  # noqa: F401  (first: kernel modules below are decorated in its mode)
from .int6_matmul import dequantize_int6, int6_matmul, int6_matmul_ref, pack_int6, unpack_int6
from .leaky_relu2 import (
    FusedLeakyReLU2MLP,
    leaky_relu2,
    leaky_relu2_mlp,
    leaky_relu2_mlp_ref,
    leaky_relu2_ref,
)
from .ngram_table import NgramTable, NgramTableRef, pack_keys, types_keys
from .xsa_attention import (
    XSAAttention,
    doc_ids_from_bos,
    xsa_attention,
    xsa_attention_op,
    xsa_attention_ref,
    xsa_attention_varlen,
    xsa_attention_varlen_ref,
    xsa_flash_attn_func,
    xsa_flash_attn_varlen_func,
)

__all__ = [
    "FusedLeakyReLU2MLP",
    "NgramTable",
    "NgramTableRef",
    "dequantize_int6",
    "int6_matmul",
    "int6_matmul_ref",
    "leaky_relu2",
    "leaky_relu2_mlp",
    "leaky_relu2_mlp_ref",
    "leaky_relu2_ref",
    "pack_int6",
    "pack_keys",
    "types_keys",
    "unpack_int6",
    "XSAAttention",
    "doc_ids_from_bos",
    "xsa_attention",
    "xsa_attention_op",
    "xsa_attention_ref",
    "xsa_attention_varlen",
    "xsa_attention_varlen_ref",
    "xsa_flash_attn_func",
    "xsa_flash_attn_varlen_func",
]
