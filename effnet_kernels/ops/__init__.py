"""Fused ops: the plain-PyTorch reference plus one module per op (custom op + autograd)."""
