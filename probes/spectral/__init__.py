"""Spectral analysis of weight matrices: :mod:`~probes.spectral.analysis` (eigenvalues,
power-law fits, metrics, heat grids), :mod:`~probes.spectral.matrices` (which matrices,
LoRA merged in) and :mod:`~probes.spectral.monitor` (the probe's pass on a cadence or on
request).

Imports torch; the alert over its results lives in :mod:`probes.rules.spectral`.
"""
