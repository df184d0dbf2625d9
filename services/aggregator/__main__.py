"""`python -m services.aggregator`."""

from services.__main__ import launch

launch("aggregator")
