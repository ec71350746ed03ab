"""The MLflow tag names every OneGen run carries, and the values of ``onegen.stage``.

Training (``pipeline.train``) and evaluation (``evaluation.run``, ``evaluation.logbook``) write them;
``evaluation compare`` reads them back. One name each, here: a tag spelt differently in one stage
would silently drop its runs from the other's tables.
"""

from __future__ import annotations

TAG_STAGE = "onegen.stage"  # TRAIN_STAGE or EVAL_STAGE
TAG_METHOD = "onegen.method"  # an eval's RAG method (onegen.methods) or "onegen" for entity linking
TAG_DATASET = "onegen.dataset"  # the prepared eval set's directory name
TAG_MODEL = "onegen.model"  # the base model (training) or the checkpoint's label (evaluation)
TAG_MODE = "onegen.mode"  # the training loss mode (pipeline.config.LossConfig.mode)
TAG_TASK = "onegen.task"  # rag or el
TAG_SETTING = "onegen.setting"  # the eval's document setting (e.g. distractor)
TAG_TRAIN_RUN = "onegen.train_run_id"  # an eval run's link to its training run (never mlflow.parentRunId)
TAG_TRAIN_STORE = "onegen.train_tracking_uri"  # the store that training run lives in
TAG_RESULTS_ID = "onegen.results_id"  # one id per results dir: `evaluation log` refuses to log it twice
TAG_LOGGED_LATER = "onegen.logged_later"  # set by `evaluation log`: when the results reached MLflow
TAG_REPLACED_BY = "onegen.replaced_by"  # on a run an outage left unfinished: the run `evaluation log` made instead

TRAIN_STAGE = "train"
EVAL_STAGE = "eval"
