"""Accelerator kernels for CUDA and MUSA (Triton launchers and library bindings).

Modules here take explicit tensors and register nothing; the platform wiring decides
which op each launcher serves. Each module imports without its library and says so in
``AVAILABLE``.
"""
