"""XIG — cross-community imaging gateway (IHE XCPD / XCA / XCA-I over mTLS with XUA)."""

__version__ = "0.1.0"
