"""`python -m services.control`."""

import signal
import sys

# A stop request that arrives while the process is still importing: nothing to flush yet.
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

from services.control.service import ControlService  # noqa: E402
from shared.runtime import main  # noqa: E402

main(ControlService)
