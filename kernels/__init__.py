"""Triton kernels of rosita_fast (installed as ``rosita_fast.kernels``).

Each file holds one op: its Triton kernels, the launch-configuration table (every configuration a
kernel can be launched with, which the lowering tests compile for sm_80 and sm_90), and plain Python
forward/backward launchers. Autograd and the op registry live in ``rosita_fast.ops``.
"""
