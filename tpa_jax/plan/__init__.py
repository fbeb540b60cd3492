"""Planning: per-device memory and FLOPs of a train step, from abstract shapes."""
