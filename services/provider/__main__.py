"""`python -m services.provider`."""

from services.provider.service import ProviderService
from shared.runtime import main

main(ProviderService)
