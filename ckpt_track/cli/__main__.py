"""``python -m ckpt_track.cli``: the same command line as the ``ckpt-track`` script."""

from __future__ import annotations

import sys

from . import main

if __name__ == "__main__":
    main(sys.argv[1:])
