"""Benchmarks of s3datafs against its peers (scripts, not tests): see bench/RESULTS.md."""
