"""Handlers that ship with the worker."""
