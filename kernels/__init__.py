"""Triton kernels, installed as qbert.kernels. Importing any of them imports Triton."""
