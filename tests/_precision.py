"""Tolerances derived from the precision a test runs in, not tuned to one machine.

The suite runs on AVX2-only CPUs (bf16 autocast off: fp32 matmuls) and on AMX/AVX512-BF16 CPUs
(autocast on by default: bf16 matmul inputs and outputs, fp32 accumulation). The tests that
compare two numerically different but equivalent computations force the precision (``PRECISIONS``
below, as the ``train.autocast_bf16`` value) and run in both, so every machine checks both, and
take their tolerance from here.

- ``u``: the unit roundoff of the format the results are rounded to: 2^-24 for fp32, 2^-8 for
  bf16 (8 significant bits).
- ``reordered_sum_rtol(precision, n)``: two runs that sum the same n terms in different orders.
  In fp32 the classic bound for a sum of n terms is gamma_n = n·u/(1 − n·u) relative to the sum
  of magnitudes (Higham, *Accuracy and Stability*, §4.2); each side carries its own error, so
  the two agree to 2·gamma_n. Under bf16 autocast the accumulation is still fp32, but the result
  is then rounded to bf16, and a reordered fp32 sum can land on the other side of a bf16 rounding
  boundary: at most one bf16 unit (2u) apart, whatever n is, plus the fp32 part.
- ``TRAJECTORY_RTOL``: beyond the first optimiser step the difference of the two runs is
  amplified by training (the weights differ, and so do the next gradients), so no roundoff bound
  holds step after step. Training curves are then required to agree to 2^-7 relative: one bf16
  rounding of the loss. A kernel bug shows at step 0, where the bound is the tight one above.
"""

from __future__ import annotations

# the train.autocast_bf16 value that forces each precision, on any CPU
PRECISIONS = {"fp32": "off", "bf16": "on"}
UNIT_ROUNDOFF = {"fp32": 2.0**-24, "bf16": 2.0**-8}
TRAJECTORY_RTOL = 2.0**-7


def reordered_sum_rtol(precision: str, n: int) -> float:
    """Relative tolerance between two orders of summing ``n`` terms, rounded to ``precision``."""
    u32 = UNIT_ROUNDOFF["fp32"]
    gamma = n * u32 / (1 - n * u32)
    if precision == "fp32":
        return 2 * gamma
    return 2 * UNIT_ROUNDOFF["bf16"] + 2 * gamma
