"""Headless core: stdlib + numpy + opencv only (no Qt, no torch; checked by import-linter)."""
