"""``python -m foundry_local_py``: the ``foundry-local`` command (works before the script is on PATH)."""

from .cli.main import main

if __name__ == "__main__":  # pragma: no cover
    main()
