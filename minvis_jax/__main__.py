"""`python -m minvis_jax <command>`: the same as the `minvis-jax` console script."""

import sys

from minvis_jax import cli

sys.exit(cli.main())
