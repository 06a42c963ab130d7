"""Environments: where tasks come from and how responses are verified."""
