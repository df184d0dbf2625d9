"""`python -m services.aggregator`."""

from services.aggregator.service import AggregatorService
from shared.runtime import main

main(AggregatorService)
