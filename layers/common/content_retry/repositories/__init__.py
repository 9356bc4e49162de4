"""Data access: one module per table group, each owning its SQL.

Every function takes the caller's connection and never commits: the service
that calls it opens the transaction (one unit of work). Statements are built
from :mod:`content_retry.tables`.
"""
