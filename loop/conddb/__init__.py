"""Conditions database: library, HTTP service and client (see loop.conddb.client)."""
