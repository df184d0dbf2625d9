"""`python -m services.provider`."""

import signal
import sys

# A stop request that arrives while the process is still importing: nothing to flush yet.
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

from services.provider.service import ProviderService  # noqa: E402
from shared.runtime import main  # noqa: E402

main(ProviderService)
