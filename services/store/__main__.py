"""`python -m services.store`."""

from services.store.service import StoreService
from shared.runtime import main

main(StoreService)
