"""Storage: slot allocators per pool group per tier, pool buffers (NumPy host memory,
file-backed disk, torch CPU/CUDA/pinned), page addressing and the copy engine."""
