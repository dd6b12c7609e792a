"""Many boards and many builds: the device pool, the profiling agent, the release matrix."""
