"""The version of fastbn: its one source (pyproject.toml reads it, fastbn re-exports it)."""
__version__ = "0.2.0.dev0"
