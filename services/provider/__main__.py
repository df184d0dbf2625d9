"""`python -m services.provider`."""

from services.__main__ import launch

launch("provider")
