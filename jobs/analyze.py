"""``ray job submit -- python jobs/analyze.py ...``: the same as ``adre-ray analyze``."""
import sys

from adre_ray.analysis.report import main

sys.exit(main(sys.argv[1:]))
