"""The accelerator tier (CUDA, and MUSA through its CUDA-compatible libraries): vendor and
Triton kernels over the paged cache. The CUDA and MUSA platforms register each module's
kernels for their device type; a module whose library is missing fails to import and the
tiers below serve. The Triton modules (triton_attention, triton_elementwise) are plain
launchers instead: they import without triton, say so in AVAILABLE, and register nothing."""
