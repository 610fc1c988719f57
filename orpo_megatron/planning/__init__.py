"""Planning a run before launching it: per-GPU memory, per-step work and time, the assumed workload, layout search."""
