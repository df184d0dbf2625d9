"""mdp services: one subpackage per process."""
