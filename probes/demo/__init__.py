"""The demo job: a small GPT-2 built from a config, trained on the bundled text,
with the probe attached and faults to inject. ``python -m probes.demo`` runs it.
"""
