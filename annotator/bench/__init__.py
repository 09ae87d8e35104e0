"""Benchmarks: they measure and report; speed goals live here, never in timed tests."""
