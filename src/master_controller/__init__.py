"""master-controller: disposable, isolated browsers for signing in to CLI tools."""

__version__ = "0.1.0"
