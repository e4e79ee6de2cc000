"""`python -m clara_jax.cli ...`, the same as the `clara-jax` console script."""

import sys

from clara_jax.cli import main

sys.exit(main())
