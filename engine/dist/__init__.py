"""Running one download over several machines (``oidl-engine run ... --ray``): see :mod:`engine.dist.ray_run`."""
