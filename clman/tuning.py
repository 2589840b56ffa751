"""Moved to the :mod:`clman.tune` package; this name stays so ``from clman import tuning`` keeps working.

It imports the sweep driver, and with it Ray: Ray-free code imports from
``clman.tune.space``, ``.sweep``, ``.resources`` or ``.results`` directly.
"""

from clman.tune.driver import (  # noqa: F401
    PlacementGroupReaper, ResumableASHA, _check_data, _epoch_report_callback, _StoredTrial, _train_job,
    _trainable, _tuner, collect, reap_orphaned_placement_groups, run_sweep, train_driver, tune_domain,
)
from clman.tune.resources import DRIVER_CPUS, decode_cpus, max_concurrent_trials  # noqa: F401
from clman.tune.results import (  # noqa: F401
    _BOOKKEEPING, TrialRecord, _best_row, _fmt, _lr_key, _one_line, _parquet, _scalar, _unscalar, best_tree,
    epochs_table, plot_png, summary_markdown, trial_statuses, trials_table, write_results,
)
from clman.tune.sweep import (  # noqa: F401
    JOBS, PLOT_FILES, SCHEDULERS, SCORES, SEARCHES, SWEEP_FILE, TABLE_METRICS, TIME_ATTR, TRAIN_DIR, VAL_METRICS,
    Sweep, load_sweep, new_sweep,
)
from clman.errors import JobError  # noqa: F401
from clman.tune.space import SearchSpace, SpaceError, space_from_dict  # noqa: F401
