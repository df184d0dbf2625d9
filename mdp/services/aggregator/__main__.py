"""`python -m mdp.services.aggregator`."""

from mdp.services.__main__ import launch

launch("aggregator")
