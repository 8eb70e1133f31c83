"""Helpers of the test suite that are not tests: real servers and clients, paths."""
