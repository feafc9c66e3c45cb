"""Evaluation: one entry point, ``evaluate(model, tokens, config) -> EvalResult``.

Modules, by job (``docs/evaluation.md`` has the map):

* ``pipeline``: ``evaluate`` and ``EvalResult``, the only place the steps are sequenced;
* ``plan``: what an evaluation does (``EvalPlan``), decided once from a ``RunConfig``;
* ``scoring``: windows, per-token model scores, bits per byte, the validation stream;
* ``counts``, ``blend``: the n-gram cache's exact counts and its normalised blend;
* ``fit``: fitting the cache's parameters and their file; ``hashed``: the record's hashed
  cache, the negative example; ``cache_audit``: the cache's audit; ``cache``: the cache as a
  step of an evaluation;
* ``ttt``, ``ttt_audit``: score-first test-time training and its audit.
"""

from proteus.eval.pipeline import EvalResult, evaluate
from proteus.eval.plan import EvalPlan, make_plan, validation_plan
from proteus.eval.scoring import eval_window, format_bpb, load_eval_tokens
from proteus.eval.ttt import check_ttt_fits

__all__ = ["EvalPlan", "EvalResult", "check_ttt_fits", "eval_window", "evaluate", "format_bpb",
           "load_eval_tokens", "make_plan", "validation_plan"]
