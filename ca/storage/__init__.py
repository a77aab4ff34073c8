"""Where the CA keeps its records: SQLite in the CA home (the embedded default) or PostgreSQL,
shared by several ``pkictl serve`` replicas; the location setting and the two engines behind one
interface.

The package holds no code of its own: import from its modules."""
