"""Subcommands of the ``cryonb`` command line (one module each: ``add_parser``, ``run``)."""
