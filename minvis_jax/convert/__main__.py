"""`python -m minvis_jax.convert ...`: the same as `minvis-jax convert ...`."""

import sys

from minvis_jax import cli

sys.exit(cli.main(['convert'] + sys.argv[1:]))
