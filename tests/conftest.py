"""Test setup: 8 fake CPU devices so sharded code paths run on one host.

Must run before any JAX operation initialises the backend.
"""
import jax

jax.config.update("jax_num_cpu_devices", 8)
