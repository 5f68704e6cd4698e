"""Command-line interface: ``cryoai <command>``; one module per command (add_args / main)."""
