"""Triton kernels of fused_resnet, installed as ``fused_resnet.kernels``.

Plain ``@triton.jit`` functions and their launchers live here; the autograd functions
and ``torch.library`` registrations that use them live in ``fused_resnet``.
"""
