"""The gateway's mTLS listener: the server, each connection, authorization, connection logs, the node table and its report to the CA.

The package holds no code of its own: import from its modules."""
