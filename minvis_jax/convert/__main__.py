import sys

from minvis_jax import cli
from minvis_jax.convert import main

sys.exit(cli.run('minvis-jax convert', main, sys.argv[1:]))
