"""The command-line entry points (``python scripts/<name>.py``), importable as ``scripts.<name>`` from the
repository root (the tests do so)."""
