"""The shared core of the inference server: settings, database, job contract, engine, storage, CLI."""

__version__ = "0.1.0"
