"""``ray job submit --working-dir . -- python jobs/convert.py SRC --output-dir DST``: the same as
``adre-ray convert``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir's adre_ray first

from adre_ray.distributed.convert import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
