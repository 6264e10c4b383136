"""Escapement services: the edge, the worker and the `escapement` CLI."""
