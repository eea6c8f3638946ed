"""Throughput regression harness for oidl-engine: ``python -m bench run`` (see bench/README.md)."""
