"""proto4d: a resident supervisor that keeps one web app alive and updates it without anyone noticing."""

__version__ = "0.1.0"
