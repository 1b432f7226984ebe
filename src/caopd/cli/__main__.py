"""``python -m caopd.cli`` (torchrun and the training jobs start the CLI this way)."""

import sys

from caopd.cli import main

sys.exit(main())
