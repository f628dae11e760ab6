"""``ray job submit --working-dir . -- python jobs/tune.py --space S --config C`` = ``adre-ray tune``."""
import sys

from adre_ray.distributed.tune import main

sys.exit(main(sys.argv[1:]))
