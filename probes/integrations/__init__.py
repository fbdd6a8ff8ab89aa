"""Callbacks for training frameworks: Hugging Face ``Trainer`` and Lightning.

Their public names stay :mod:`probes.hf` and :mod:`probes.lightning`.
"""
