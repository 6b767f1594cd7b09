"""Scoring generated volumes against their targets, and the test run that writes the results page."""
