from __future__ import annotations

import sys

from hotrelay.cli import main

sys.exit(main())
