"""``python -m pki_agent`` = the ``pki-agent`` command."""

from .cli import main

main()
