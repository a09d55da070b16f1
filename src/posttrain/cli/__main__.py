"""`python -m posttrain.cli ...` (how torchrun starts posttrain): the `posttrain` command."""

import sys

from posttrain.cli import main

sys.exit(main())
