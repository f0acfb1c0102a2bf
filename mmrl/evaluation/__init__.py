"""Evaluation of mmrl (and any open_clip-contract) models.

Tasks, each with a CLIP_benchmark-style ``evaluate(model, dataloader(s), ..., device) -> dict``
and a ``run_*`` used by ``mmrl eval`` (cached features, result file with a protocol block):

=================== ================================ ===============================================
task                module                           metrics
=================== ================================ ===============================================
zeroshot_retrieval  :mod:`.retrieval`                ``image_retrieval_recall@K``, ``text_retrieval_recall@K``,
                                                     ``rsum``; COCO: ``fold1k_*``; ECCV/CxC (``eccv_caption``)
zeroshot_classif.   :mod:`.zeroshot`                 ``acc1``, ``acc5``, ``mean_per_class_recall``
linear_probe        :mod:`.linear_probe`             ``lp_acc1``, ``lp_acc5``, ``lp_mean_per_class_recall``
image_retrieval     :mod:`.image_retrieval`          ``recall@1/2/4/8``, ``map@r``
cross_retrieval     :mod:`.cross_retrieval`          ``q2g_recall@K``, ``g2q_recall@K``, ``recall@K`` (mean)
=================== ================================ ===============================================

``--model raw-pixels[:SIZE]`` evaluates the raw-pixel baseline of :mod:`.raw_pixels` (image
tasks only).

Supporting modules: :mod:`.ranking` (exact chunked ranking), :mod:`.annotations` (COCO/Flickr
formats), :mod:`.datasets` (image folders, named transfer datasets), :mod:`.prompts`,
:mod:`.features` (extraction + cache), :mod:`.results`, :mod:`.suite`, :mod:`.table`.
"""
from .context import EvalModel, ModelInfo, RunOptions, load_eval_model
from .linear_probe import LinearProbeOptions

__all__ = ["EvalModel", "ModelInfo", "RunOptions", "load_eval_model", "LinearProbeOptions"]
