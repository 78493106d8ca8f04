"""Benchmarks: load against OpenAI-compatible endpoints, side by side with peers, and engine ceilings.

Speed goals are measured here and reported as ratios from one run; tests never time things.
"""
