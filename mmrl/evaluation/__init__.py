"""Evaluation of mmrl (and any open_clip-contract) models.

Tasks, each with a CLIP_benchmark-style ``evaluate(model, dataloader(s), ..., device) -> dict``
and a registered :class:`~.tasks.Task` (:mod:`.tasks`: its options -- the ``mmrl eval TASK`` flags
and the suite entry keys --, headline and shown metrics, run function) used by ``mmrl eval``
(cached features, result file with a protocol block):

================ ======================= ======================= ======================================================
task (CLI/suite) result ``task``         module                  metrics (headline first)
================ ======================= ======================= ======================================================
retrieval        zeroshot_retrieval      :mod:`.retrieval`       mean of the six R@1/5/10 (headline),
                                                                 ``image_retrieval_recall@K``,
                                                                 ``text_retrieval_recall@K``, ``rsum``; COCO:
                                                                 ``fold1k_*``; ECCV/CxC (``eccv_caption``)
zeroshot         zeroshot_classification :mod:`.zeroshot`        ``acc1``, ``acc5``, ``mean_per_class_recall``
linear-probe     linear_probe            :mod:`.linear_probe`    ``lp_acc1``, ``lp_acc5``, ``lp_mean_per_class_recall``
image-retrieval  image_retrieval         :mod:`.image_retrieval` ``recall@1``, ``recall@2/4/8``, ``map@r``
cross-retrieval  cross_retrieval         :mod:`.cross_retrieval` ``recall@1`` (mean of the two directions),
                                                                 ``q2g_recall@K``, ``g2q_recall@K``, ``recall@K``
================ ======================= ======================= ======================================================

``--model raw-pixels[:SIZE]`` evaluates the raw-pixel baseline of :mod:`.raw_pixels` (image
tasks only).

Supporting modules: :mod:`.tasks` (the task registry), :mod:`.options` (task options: flags and
suite keys), :mod:`.ranking` (exact chunked ranking), :mod:`.annotations` (COCO/Flickr formats),
:mod:`.datasets` (image folders, named transfer datasets), :mod:`.prompts`, :mod:`.features`
(extraction + cache), :mod:`.results`, :mod:`.suite` (suites and their results), :mod:`.table`.
"""
# isort: off
# the built-in tasks, in the order `mmrl eval --help` lists them: importing a task's module registers it
from . import retrieval, zeroshot, linear_probe, image_retrieval, cross_retrieval  # noqa: F401
# isort: on
from .context import EvalModel, ModelInfo, RunOptions, load_eval_model
from .linear_probe import LinearProbeOptions
from .options import TaskOptions, option
from .suite import EntryResult, Suite, SuiteEntry, load_suite, read_suite_results, run_suite
from .tasks import Headline, Metric, Task, get_task, register, task_of_result, tasks, unregister

__all__ = ["EvalModel", "ModelInfo", "RunOptions", "load_eval_model", "LinearProbeOptions", "Task", "Metric",
           "Headline", "register", "unregister", "get_task", "tasks", "task_of_result", "TaskOptions", "option",
           "EntryResult", "Suite", "SuiteEntry", "load_suite", "run_suite", "read_suite_results"]
