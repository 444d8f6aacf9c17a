from __future__ import annotations

from unet_pipe.cli import main

raise SystemExit(main())
