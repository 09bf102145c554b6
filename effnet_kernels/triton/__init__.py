"""Triton kernels (GPU; on CPU only under TRITON_INTERPRET=1). One module per op."""
