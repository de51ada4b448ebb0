"""``python -m ckpt_track``: the ``ckpt-track`` command."""

from .cli import main

if __name__ == "__main__":
    main()
