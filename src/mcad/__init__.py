"""mcad: multi-class unsupervised anomaly detection."""

__version__ = "0.1.0"
