"""`python -m services.control`."""

from services.__main__ import launch

launch("control")
