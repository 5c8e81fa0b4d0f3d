"""`python -m sae_lens` is the `sae-lens` command."""

import sys

from sae_lens.cli import main

sys.exit(main())
