"""Pipeline stages: one module per `python -m dermaops <stage>` subcommand (see cli.STAGES)."""
