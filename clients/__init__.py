"""Clients for the localist server: typed Python client and the `localist` CLI."""
