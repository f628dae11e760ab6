"""``python jobs/demo.py`` (or ``ray job submit -- python jobs/demo.py``) = ``adre-ray demo``."""
import sys

from adre_ray.demo import main

sys.exit(main(sys.argv[1:]))
