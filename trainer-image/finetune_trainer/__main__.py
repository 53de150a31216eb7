"""`python -m finetune_trainer`: one trainer process (see entrypoint.py; pods run launch.py)."""

import sys

from finetune_trainer.entrypoint import main

sys.exit(main(sys.argv[1:]))
