"""fpl_fast: private, personalized federated prompt learning on frozen CLIP, with fused C++/CUDA ops."""

from fpl_fast.ops import cpu_isa, has_cpp_ops, has_cuda_kernels

__version__ = "0.1.0"
__all__ = ["has_cpp_ops", "has_cuda_kernels", "cpu_isa", "__version__"]
