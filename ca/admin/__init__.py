"""The operator's web page in pkictl serve: its admin listener, the page and the expiry timeline it draws.

The package holds no code of its own: import from its modules."""
