"""oidl-engine: download, verify, convert and package Open Images (and any image URL list)."""

__version__ = "0.1.0"
