"""The CPU tier: pagoda's C kernels (csrc/, built and bound by native.py) and torch's CPU
kernels, one module per kind of op. The CPU platform registers each module's kernels."""
