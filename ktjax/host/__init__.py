"""Glue between JAX programs and host (CPU) kernels: XLA FFI targets."""
