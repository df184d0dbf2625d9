"""`python -m mdp.services.provider`."""

from mdp.services.__main__ import launch

launch("provider")
