"""Spectral analysis of weight matrices (eigenvalues, power-law fits, heat grids).

Imports torch; the alert over its results lives in :mod:`probes.rules.spectral`.
"""
