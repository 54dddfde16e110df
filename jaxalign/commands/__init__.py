"""One module per `jaxalign` subcommand, each with ``register(subparsers)`` and ``run(args)``."""
