"""cke: a self-healing control-plane manager in the style of CKE."""

__version__ = "0.1.0"
