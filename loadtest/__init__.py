"""Load generation and benchmarks for Escapement."""
