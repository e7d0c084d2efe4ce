"""opsctl: find RQ jobs stuck in the started state and clean them up from a YAML policy."""

__version__ = "0.1.0"
