"""The EST service (RFC 7030): its wire format, answers, CSR attributes, TLS front, request log, signing workers, rate limits and the service itself.

The package holds no code of its own: import from its modules."""
