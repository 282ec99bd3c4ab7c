"""Shared test setup: 8 fake CPU devices (sharding tests use sub-meshes of them)."""
import os
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))
