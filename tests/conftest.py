"""Test session setup: four XLA host devices so sharding/pmap paths run on CPU."""

import jax

# Must happen before any backend use. Single-device tests are unaffected (they
# run on device 0); multi-device tests shard over 2 or 4 of these.
jax.config.update('jax_num_cpu_devices', 4)
