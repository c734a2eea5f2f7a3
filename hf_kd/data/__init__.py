"""Datasets: loading user data, and the built-in demo and synthetic tasks."""
