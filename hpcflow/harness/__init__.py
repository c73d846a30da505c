"""Scenario replay harness: infrastructure for running and comparing workflows."""
