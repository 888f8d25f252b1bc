"""Learning and running jobs: data, models, services, CLI."""
