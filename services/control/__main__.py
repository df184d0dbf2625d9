"""`python -m services.control`."""

from services.control.service import ControlService
from shared.runtime import main

main(ControlService)
