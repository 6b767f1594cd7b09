"""Helpers shared by the scripts: registries, run-time setup, logging, display, HTML pages."""
