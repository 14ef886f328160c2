"""Fine-tune a multilingual encoder with a robust objective on DeepSpeed.

    deepspeed train.py --deepspeed ds_configs/zero2.json                     # embedded default, 1 rank
    deepspeed --num_gpus 2 train.py --deepspeed ds_configs/zero3.json --objective pgd
    torchrun --nproc_per_node 2 train.py --deepspeed ds_configs/zero2.json --objective gaussian

``--deepspeed`` takes the DeepSpeed JSON path directly (as the Hugging Face Trainer does);
DeepSpeed's own ``--deepspeed --deepspeed_config PATH`` spelling works too. Every option:
``python train.py --help``.
"""

import sys

from dist_robust.cli import leave, train_main

if __name__ == "__main__":
    sys.exit(leave(train_main()))
