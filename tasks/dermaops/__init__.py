"""DermaOps stage package: every pipeline stage is `python -m dermaops <stage> [flags]`."""

__version__ = "0.1.0"
