"""TensorRT plugins of the HAM ops, installed as ``ham_export.plugins_trt`` (the top-level folder ``plugins_trt/``).

- :mod:`.specs`: each op's plugin, made from its op spec: plugin name (the ONNX op type TensorRT's parser looks up),
  version, namespaces (``ham`` for the Quickly Deployable Plugins, ``ham_cpp`` for the C++ library), I/O dtypes
  (a bool becomes int32: TensorRT plugins take no bool I/O) and the aliased outputs (the caches, in place).
- :mod:`.rewrite`: the custom-op ONNX graph rewritten into the nodes TensorRT turns into plugins.
- :mod:`.launch`: what a plugin launches, without TensorRT: which Triton kernel, its grid and scalar arguments as
  functions of the shapes, its PTX for a GPU target.
- :mod:`.qdp`: the Quickly Deployable Plugins (``tensorrt.plugin``: ``register`` and ``aot_impl``), built from
  :mod:`.launch`; importing it needs TensorRT.
- ``cpp/``: the C++ IPluginV3 library ``libham_trt_plugins.so`` over the CUDA kernels of ``runtimes/common``.

Each op has a folder with a README: ``cache_attention/``, ``cache_append/``, ``gdn_prefill/``.
"""
