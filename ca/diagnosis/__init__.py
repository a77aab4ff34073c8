"""Diagnosis: findings, the CA's doctor and the checks it runs on credentials, CRLs and leaked secrets.

The package holds no code of its own: import from its modules."""
