"""The one package that talks to MLflow, one job a module: the store (`store`), run names, tags and metric
names (`naming`), a stage's run (`runs`), replaying DVC's record and `newllm compare`'s run (`sync`), and the
UI's links, answer view and local server (`ui`). DVC's files are the record (newllm.records writes them);
MLflow mirrors them. What the rest of the project uses is imported here: `from newllm import tracking`."""

# ruff: noqa: I001 (grouped by module, not one name a line)
# What the rest of the project uses (`from newllm import tracking`, then tracking.<name>):
from newllm.gitinfo import baseline_rev, changed_vs_baseline, dvc_exp_name, file_at, git_commit, project_root  # noqa: F401
from newllm.records import TIMING_KEYS, split_timing, write_metrics, write_plot  # noqa: F401
from newllm.tracking.naming import (CHANGED_TAG, END_REASON_TAG, HEADLINE, HOST_TAG, PARENT_ID_TAG,  # noqa: F401
                                    PARENT_TAG, PID_TAG, REPORT, STEP_TIMING, STUDY_TAG, SUMMARY, ablation_label,
                                    experiment_parent, metric_key, nested_tags, run_tags, study_tag)
from newllm.tracking.runs import RankRun, StageRun, Terminated, end_orphans, rank_run, stage_run  # noqa: F401
from newllm.tracking.store import (EXPERIMENT_KIND_TAG, SQLITE_HEADER, TrackingError, check_store,  # noqa: F401
                                   init_store, run_url, tracking_uri)
from newllm.tracking.sync import log_compare, sync  # noqa: F401
from newllm.tracking.ui import (ANSWER_SORT, ANSWER_VIEW, ML_MODE, PARENTS_FILTER, SHARED_VIEW_TAG,  # noqa: F401
                                answer_view, has_answer_view, local_server, ui_links, ui_run_url)
