"""``adre-ray convert SRC --output-dir DST``: an ImageFolder tree into Parquet shards, one Ray task per shard.

The plan, the shard writer and the final check are :mod:`adre_ray.data.convert` (no Ray). Every node
that runs a task must see ``SRC`` and ``DST`` at the same paths (one machine, or a shared filesystem);
copy ``DST`` to object storage afterwards (``aws s3 sync DST s3://bucket/imagenet``) to train from there.
Bad input is refused before anything is written: a missing or empty folder, an empty class folder, a
file whose name is not an image's, train / val class folders that differ, or Parquet files in ``DST`` that
this conversion would not write. A file with an image name that Pillow cannot read fails its shard only
(shards are written whole or not at all); fix it and rerun: finished shards are skipped.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adre_ray.data.convert import SplitPlan

DEFAULT_ROWS_PER_FILE = 10_000
DEFAULT_ROWS_PER_GROUP = 500


def convert_image_folder(src: str | Path, dst: str | Path, *, rows_per_file: int = DEFAULT_ROWS_PER_FILE,
                         rows_per_group: int = DEFAULT_ROWS_PER_GROUP, seed: int = 0,
                         cpus_per_task: float = 1.0) -> dict[str, dict[str, int]]:
    """Convert ``src`` into ``dst/<split>/*.parquet`` on the connected Ray cluster (see module docstring).

    Returns per split {"rows", "files", "written", "skipped"}; ``ValueError`` for bad input or a failed
    final check."""
    import ray

    if isinstance(rows_per_group, bool) or not isinstance(rows_per_group, int) or rows_per_group < 1:
        raise ValueError(f"rows_per_group={rows_per_group!r}: must be an integer >= 1")
    if not cpus_per_task > 0:
        raise ValueError(f"cpus_per_task={cpus_per_task!r}: must be > 0")
    dst = Path(dst).expanduser().resolve()
    from adre_ray.data.convert import check_no_foreign_files, check_split, plan_conversion, write_shard

    plans: list[SplitPlan] = plan_conversion(Path(src).expanduser().resolve(), rows_per_file=rows_per_file,
                                             seed=seed)
    for plan in plans:
        check_no_foreign_files(plan, dst)
    write = ray.remote(num_cpus=cpus_per_task, max_retries=0)(write_shard)
    pending: dict[Any, tuple[SplitPlan, str]] = {}
    for plan in plans:
        for shard in plan.shards:
            ref = write.remote(shard, plan.folder, plan.class_names, dst, rows_per_group=rows_per_group)
            pending[ref] = (plan, shard.name)
    outcomes: dict[str, dict[str, int]] = {p.name: {"written": 0, "skipped": 0} for p in plans}
    errors: list[str] = []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        plan, _name = pending.pop(done[0])
        try:
            outcomes[plan.name][ray.get(done[0])] += 1
        except ValueError as err:  # a Ray task's ValueError comes back as a subclass of it
            errors.append(str(err).strip().splitlines()[-1])
    if errors:
        raise ValueError(f"{errors[0]}" + (f" (and {len(errors) - 1} more shard(s) failed)"
                                           if len(errors) > 1 else ""))
    for plan in plans:
        outcomes[plan.name].update(check_split(plan, dst))
    return outcomes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adre-ray convert",
        description="Convert an ImageFolder tree (SRC/train/<class>/*, SRC/val/<class>/*, or one split "
                    "folder SRC/<class>/*) into Parquet shards DST/<split>/*.parquet (image bytes as "
                    "stored, label = index of the sorted class folder names), in parallel Ray tasks; "
                    "resumable, checked at the end.")
    parser.add_argument("src", help="the ImageFolder tree")
    parser.add_argument("--output-dir", required=True, help="where DST/<split>/part-*.parquet are written")
    parser.add_argument("--rows-per-file", type=int, default=DEFAULT_ROWS_PER_FILE,
                        help=f"images per Parquet file (default {DEFAULT_ROWS_PER_FILE})")
    parser.add_argument("--rows-per-group", type=int, default=DEFAULT_ROWS_PER_GROUP,
                        help=f"images per Parquet row group (default {DEFAULT_ROWS_PER_GROUP})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the row shuffle across shards")
    parser.add_argument("--cpus-per-task", type=float, default=1.0, help="CPUs reserved per shard task")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address, or 'local' (default: $RAY_ADDRESS, else a running local "
                             "cluster, else a new local one)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``adre-ray convert``: exit 0 on success, 2 on bad input or a failed check (message on stderr)."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from adre_ray.data.convert import plan_conversion  # imports torch: after --help has exited
    from adre_ray.distributed._common import connect_ray, interrupted

    try:
        # refuse bad input before starting Ray (the plan reads no image)
        plan_conversion(args.src, rows_per_file=args.rows_per_file, seed=args.seed)
    except ValueError as err:
        print(f"adre-ray convert: error: {err}", file=sys.stderr)
        return 2
    started = False
    begun = time.perf_counter()
    try:
        started = connect_ray(args.address)
        outcomes = convert_image_folder(args.src, args.output_dir, rows_per_file=args.rows_per_file,
                                        rows_per_group=args.rows_per_group, seed=args.seed,
                                        cpus_per_task=args.cpus_per_task)
    except ValueError as err:
        print(f"adre-ray convert: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: finished shards are kept, a re-run skips them
        return interrupted("convert", stop)
    finally:
        if started:
            import ray

            ray.shutdown()
    for split, info in outcomes.items():
        print(f"{split}: {info['rows']} rows in {info['files']} files under "
              f"{Path(args.output_dir) / split} ({info['written']} written, {info['skipped']} already there; "
              "rows per class checked)")
    print(f"took {time.perf_counter() - begun:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
