"""`python -m services.store`."""

from services.__main__ import launch

launch("store")
