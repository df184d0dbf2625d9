"""`python -m services.router`."""

from services.router.service import RouterService
from shared.runtime import main

main(RouterService)
