"""content-retry: one judge decides what learning content needs regenerating; a
worker regenerates it and saves it without ever losing what it generated."""

__version__ = "0.1.0"
