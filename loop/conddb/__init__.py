"""Conditions database: library, HTTP service and client (see loop.conddb.client)."""

DEFAULT_MAX_BODY = 16 * 1024 * 1024
"""Largest request body the HTTP service accepts by default (bytes)."""
