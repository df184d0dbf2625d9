"""`python -m mdp.services.router`."""

from mdp.services.__main__ import launch

launch("router")
