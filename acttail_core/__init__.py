"""ActTail Explorer core engine."""
__version__ = "0.3.0"
