"""``ray job submit --working-dir . -- python jobs/train.py --config ...``: the same as ``adre-ray train``."""
import sys

from adre_ray.distributed.train import main

sys.exit(main(sys.argv[1:]))
