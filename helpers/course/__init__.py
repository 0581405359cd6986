"""What keeps the course notebooks short: ``from helpers import course as nb`` gives every call they make.

- :mod:`~helpers.course.runtime`: where the notebook runs (Colab, GPU, a person watching) and which model to use;
- :mod:`~helpers.course.params`: the notebooks' parameters, typed by the recipe's declarations;
- :mod:`~helpers.course.notebook`: the one ``setup`` call and the training, evaluation and reload cells;
- :mod:`~helpers.course.display`: tables (Markdown objects whose plain ``repr`` is the text), the live loss plot,
  the comparison explorer.

Everything also works outside Jupyter.
"""

from ..estimate import NOTEBOOK_GPUS, full_size_line  # noqa: F401
from ..run.evaluation import heldout_perplexity  # noqa: F401
from .display import (  # noqa: F401
    ComparisonExplorer,
    LiveLossPlot,
    Table,
    full_size_table,
    layout_rows,
    rankings,
    share_table,
    show_artifact,
    show_examples,
    show_layout,
    show_metrics,
    show_predictions,
    show_runs,
    tensorboard_hint,
)
from .notebook import (  # noqa: F401
    Course,
    choose_prefix_projection,
    drive_runs_dir,
    find_runs,
    loss_windows,
    main_task,
    other_runs,
    progress_bars,
    quick_runs,
    quiet_loading,
    setup,
    show,
    start_tensorboard,
    task_files,
)
from .params import Params, params_from_env, setup_parameters  # noqa: F401
from .runtime import (  # noqa: F401
    REAL_MODEL,
    TOY_BANNER,
    choose_model,
    default_runs_dir,
    in_colab,
    interactive_frontend,
    is_toy,
    native_bf16,
    repository_root,
    runtime_info,
    runtime_report,
)
