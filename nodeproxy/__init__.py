"""nodeproxy: a per-node transparent service-mesh proxy."""

__version__ = "0.1.0"
