"""Benchmarks, installed as qbert.benchmarks and run by `qbert bench`."""
