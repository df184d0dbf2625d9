"""The contract every mdp process shares: schemas, subjects, settings, bus helpers, runtime."""
