"""Offline: ``xray-tui inspect`` (one checkpoint) and ``xray-tui compare`` (two).

Imports torch; nothing here runs inside a training process.
"""
