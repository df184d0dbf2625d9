"""`python -m services.router`."""

from services.__main__ import launch

launch("router")
