"""Speed and memory measurements; each script prints its figures."""
