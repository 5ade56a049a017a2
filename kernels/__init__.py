"""Triton kernels of the HAM ops, installed as ``ham_export.kernels``: one module per op, each next to its
plain-PyTorch reference in :mod:`ham_export.ops.reference` (see ``kernels/README.md``)."""
