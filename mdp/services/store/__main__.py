"""`python -m mdp.services.store`."""

from mdp.services.__main__ import launch

launch("store")
