"""Benchmarks of the course's model and methods: training speed and memory, INT4 kernels, generation, loading."""
