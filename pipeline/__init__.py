"""dra-pipe spine: configuration, stores, cache identity, Ray helpers, CLI."""

__version__ = "0.1.0"
