"""Serving the deployed router: the registry (no torch), stacked inference, the HTTP API."""
