"""pki-agent doctor: the checks on an agent's credentials, gateway and tunnel, the facts they read, and the probes they run.

The package holds no code of its own: import from its modules."""
