"""Tooling around the kernels that is not part of any op: the ahead-of-time sm_90 compile report
(``aot``) and the production launches it compiles (``sm90_specs``). Nothing in training,
evaluation or the packed submission imports it."""
