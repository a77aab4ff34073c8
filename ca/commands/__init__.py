"""The ``pkictl`` commands beyond the CLI's core (:mod:`pkictl.cli`), one module per concern.

The package holds no code of its own: import from its modules."""
