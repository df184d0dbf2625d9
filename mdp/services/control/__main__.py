"""`python -m mdp.services.control`."""

from mdp.services.__main__ import launch

launch("control")
