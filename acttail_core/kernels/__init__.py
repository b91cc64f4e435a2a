"""Triton kernels of the sparse decode path (import only where the ``triton`` package is installed).

* ``select``: the per-token input of a group of projections that share it (q/k/v, gate/up, o, down):
  its prologue (residual add + RMSNorm, or act(gate) * up), the k-th largest magnitude for every
  projection's own k (or its calibrated threshold), and the kept inputs compacted into index and
  value lists.
* ``gather_gemv``: y += W x reading only the weight rows of the kept inputs, from weights stored
  input-channel-major.
* ``attention``: RoPE, KV-cache write and single-query attention for one decode step.

On a machine without a GPU the same kernels run under Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the CPU tests check them.
"""
