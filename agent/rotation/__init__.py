"""Certificate rotation: renew or rekey, install and reload; the schedule, hooks, state, re-enrollment and upkeep around it.

The package holds no code of its own: import from its modules."""
