"""Benchmarks: each compares car-grpc against a bare baseline measured in the same run."""
