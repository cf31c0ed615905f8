import sys

from minvis_jax.convert import main

sys.exit(main(sys.argv))
