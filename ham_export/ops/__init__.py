"""The HAM custom ops: one spec each (:mod:`.spec`), the plain-PyTorch reference (:mod:`.reference`), the
``torch.library`` ops (:mod:`.library`), the ONNX translations (:mod:`.onnx`), the TVM TIR kernels (:mod:`.tir`), the
generated C++ header (:mod:`.cpp`) and the compiled op libraries (:mod:`.libraries`). The Triton kernels behind the
ops on CUDA are :mod:`ham_export.kernels` (the top-level folder ``kernels/``)."""
