"""PROTEUS Triton kernels, each beside the PyTorch reference that specifies it.

One op per file: ``leaky_relu2``, ``xsa_attention``, ``int6_matmul``, ``ngram_table``,
``softcapped_ce``; their public surface is re-exported here (``from proteus.kernels import
xsa_attention``). Each op has
three surfaces under one name: the function (``leaky_relu2_mlp``), its differentiable custom op
with fake, autograd and autocast registrations (``leaky_relu2_mlp_op``, also
``torch.ops.proteus.leaky_relu2_mlp``) and an ``nn.Module`` (``FusedLeakyReLU2MLP``). Also
public: where kernels run in this process (``kernel_device``, ``interpreting``) and the n-gram
table's key format (``max_order(bits)`` tokens of ``bits`` bits each, 10 to 13: ``_keys``).

Import-time side effect (documented, and the only one): importing this package runs
``proteus.kernels._backend.configure()``, which decides how this process runs Triton kernels —
compiled on a CUDA GPU (nothing process-wide changes), Triton's interpreter on a machine without
one (Triton's interpreter switch and three documented interpreter patches; ``TRITON_INTERPRET``
overrides; see ``_backend`` for the exact list). It must run before any ``@triton.jit``
decorator below, which is why it happens at import.

Before that, one check of where the import came from (no file is read): a folder named
``proteus`` in the current folder or the script's folder (a clone of this repository, say)
comes first on ``sys.path`` and shadows the installed package, so ``proteus`` and
``proteus.kernels`` would come from two different trees (or ``proteus`` from a folder with no
``__init__.py`` at all). That is an ``ImportError`` of one line naming the shadowing folder,
instead of a confusing failure later on.
"""

from . import _origin  # noqa: F401  (first, before torch: the one-tree check above)

# isort: split
from . import _backend  # noqa: F401  (next: kernel modules below are decorated in its mode)
from ._backend import interpreting, kernel_device
from ._keys import MAX_ORDER, MAX_VOCAB_BITS, VOCAB_BITS, id_bits, max_order
from .int6_matmul import (
    Int6Linear,
    dequantize_int6,
    int6_matmul,
    int6_matmul_op,
    int6_matmul_ref,
    pack_int6,
    quantize_rows,
    replace_linear_int6,
    unpack_int6,
)
from .leaky_relu2 import (
    FusedLeakyReLU2MLP,
    LeakyReLU2,
    leaky_relu2,
    leaky_relu2_mlp,
    leaky_relu2_mlp_op,
    leaky_relu2_mlp_ref,
    leaky_relu2_op,
    leaky_relu2_ref,
)
from .ngram_table import NgramTable, NgramTableRef, pack_keys, types_keys
from .softcapped_ce import (
    SoftcappedCrossEntropy,
    softcapped_ce,
    softcapped_ce_op,
    softcapped_ce_ref,
)
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
    "MAX_ORDER",
    "MAX_VOCAB_BITS",
    "id_bits",
    "max_order",
    "VOCAB_BITS",
    "interpreting",
    "kernel_device",
    "FusedLeakyReLU2MLP",
    "Int6Linear",
    "LeakyReLU2",
    "NgramTable",
    "NgramTableRef",
    "dequantize_int6",
    "int6_matmul",
    "int6_matmul_op",
    "int6_matmul_ref",
    "leaky_relu2",
    "leaky_relu2_mlp",
    "leaky_relu2_mlp_op",
    "leaky_relu2_mlp_ref",
    "leaky_relu2_op",
    "leaky_relu2_ref",
    "pack_int6",
    "pack_keys",
    "quantize_rows",
    "replace_linear_int6",
    "SoftcappedCrossEntropy",
    "softcapped_ce",
    "softcapped_ce_op",
    "softcapped_ce_ref",
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
