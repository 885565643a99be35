"""fedsilo: cross-silo federated fine-tuning of transformer text classifiers."""

__version__ = "0.1.0"
