"""Launched by tests/test_train.py with torchrun: one optimizer step of the real engine
(ContrastiveModule + DeepSpeed + contrastive_step) on a fixed global batch, for several
configurations; rank 0 saves the consolidated parameters and the global loss of each, and every
rank's DistInfo with the MASTER_ADDR / MASTER_PORT it used (tests/test_multinode.py: torchrun per
node, SLURM's variables).

usage: torchrun --nproc_per_node N train_step_worker.py BATCH.pt OUT_DIR VARIANT [VARIANT ...]
VARIANT = name:zero_stage:grad_accum[:nan][:siglip][:group][:stem][:pstem]
(group: the batch's group ids go to the grouped CLIP loss with its image-image term;
stem: the tower has a GroupNorm conv stem; pstem: a pretrained EfficientNet-Lite0 stem, locked but for its last stage)
"""
import dataclasses
import os
import sys

import torch
import torch.distributed as dist


def main():
    import deepspeed

    from mmrl import create_model
    from mmrl.train.config import DataConfig, TrainConfig
    from mmrl.train.distributed import deepspeed_config, dist_info_from_env, init_distributed
    from mmrl.train.module import ContrastiveModule, make_loss
    from mmrl.train.optim import make_optimizer
    from mmrl.train.params import full_state_dict
    from mmrl.train.step import contrastive_step

    torch.set_num_threads(1)
    batch_path, out_dir, variants = sys.argv[1], sys.argv[2], sys.argv[3:]
    info = dist_info_from_env()
    init_distributed(info)
    data = torch.load(batch_path)
    images, texts, groups = data["image"], data["text"], data["group"]
    per_rank = images.shape[0] // info.world_size
    rows = slice(info.rank * per_rank, (info.rank + 1) * per_rank)
    for spec in variants:
        name, zero, accum, *flags = spec.split(":")
        zero, accum = int(zero), int(accum)
        micro = per_rank // accum
        # adam_eps=1 makes the first AdamW update ~ lr * g / (|g| + 1): a smooth function of the
        # gradient, so equal updates mean equal gradients (with the usual eps=1e-6 the first
        # update is ~ lr * sign(g), which float noise flips wherever g is ~0)
        cfg = TrainConfig(data=DataConfig(train="unused"), max_steps=1, batch_size=micro, grad_accum=accum,
                          zero_stage=zero, lr=1.0, adam_eps=1.0, warmup_steps=0)
        torch.manual_seed(0)
        siglip = "siglip" in flags
        extra = {"init_logit_scale": 2.302585, "init_logit_bias": -10.0} if siglip else {}
        if "stem" in flags:
            extra["vision_cfg"] = {"conv_stem": {"channels": [8, 16, 32], "norm": "groupnorm"}}
        if "pstem" in flags:
            extra["vision_cfg"] = {"pretrained_stem": {"name": "efficientnet_lite0", "train_stages": 1},
                                   "patch_size": 16}
        module = ContrastiveModule(create_model("mmrl-vit-tiny-p8-64", "ggem", **extra))
        optimizer = make_optimizer(module, cfg.lr, cfg.weight_decay, cfg.betas, cfg.adam_eps)
        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer,
                                               config=deepspeed_config(cfg, info.world_size), dist_init_required=False)
        grouped = "group" in flags
        loss_fn = make_loss("siglip" if siglip else "clip", True, True, info.rank, info.world_size,
                            grouped=grouped, image_weight=1.0 if grouped else 0.0)
        if "nan" in flags:  # a non-finite loss on the last rank only: every rank must skip
            real = loss_fn
            loss_fn = lambda *a: real(*a) * (float("nan") if info.rank == info.world_size - 1 else 1.0)  # noqa: E731
        batches = [{"image": images[rows][j * micro:(j + 1) * micro], "text": texts[rows][j * micro:(j + 1) * micro],
                    **({"group": groups[rows][j * micro:(j + 1) * micro]} if grouped else {})}
                   for j in range(accum)]
        loss, _ = contrastive_step(engine, loss_fn, batches, torch.device("cpu"), torch.float32)
        global_loss = torch.tensor(float("nan") if loss is None else float(loss))
        if info.world_size > 1:
            dist.all_reduce(global_loss)
            global_loss /= info.world_size
        state = full_state_dict(engine, module, zero)
        # each rank's place in the job and its rendezvous, as it derived them (plain types: weights_only loads)
        ranks = [{**dataclasses.asdict(info), "master": f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"}]
        if info.world_size > 1:
            ranks = ranks * info.world_size
            dist.all_gather_object(ranks, ranks[info.rank])
        if info.rank == 0:
            torch.save({"loss": float(global_loss), "skipped": loss is None, "state": state, "ranks": ranks},
                       os.path.join(out_dir, f"{name}.pt"))
        del engine
    dist.barrier()


if __name__ == "__main__":
    main()
