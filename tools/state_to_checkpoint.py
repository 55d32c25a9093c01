"""Turn a pre-training run's resumable state (RUN/state.pt) into a shippable checkpoint.

Used for BiT-Mini, whose shipped weights are a snapshot of its upstream run:
    python tools/state_to_checkpoint.py RUN/state.pt DATA OUT.safetensors --arch R26x0.5 --fp16 \
        --finetune-defaults '{"base_lr": 0.1, "resolution": [48, 40]}' --resolution 64
DATA is what the run trained on (a packed set, a shard set, or a corpus folder holding train/): it names the classes.
"""

from __future__ import annotations

import argparse
import json

import torch

from bigtransfer.data.pretraining import load_pretrain_data
from bigtransfer.engine.runstate import read_run_state
from bigtransfer.model.checkpoints import load_state, save_checkpoint
from bigtransfer.model.preprocess import data_config
from bigtransfer.model.resnetv2 import ResNetV2


def model_from_state(state_path: str, data: str, arch: str) -> tuple[ResNetV2, int]:
    """The model in a run's state.pt, labelled with the classes of the data it trained on; and its update."""
    payload = read_run_state(state_path)  # torch's restricted unpickler: the file runs no code
    state = {k.removeprefix("module."): v for k, v in payload["model"].items()}
    classes = load_pretrain_data(data).classes
    model = ResNetV2(arch, len(classes))
    load_state(model, state, state_path)
    model.labels = list(classes)
    return model, int(payload["step"])


def main() -> None:
    """Read the state, attach the training data's class names, write safetensors with metadata."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("state")
    p.add_argument("data", help="the --data the run trained on (its class list becomes the labels)")
    p.add_argument("out")
    p.add_argument("--arch", required=True)
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--finetune-defaults", type=json.loads, default=None,
                   help='JSON of recommended fine-tuning settings, e.g. \'{"base_lr": 0.1, "resolution": [48, 40]}\'')
    p.add_argument("--resolution", type=int, metavar="R",
                   help="the run's resolution, recorded as the model's data config (what predict/embed use)")
    args = p.parse_args()
    model, step = model_from_state(args.state, args.data, args.arch)
    if args.resolution is not None:
        model.data_config = data_config(args.resolution)
    extra = {"finetune_defaults": args.finetune_defaults} if args.finetune_defaults else {}
    save_checkpoint(model, args.out, dtype=torch.float16 if args.fp16 else None, source="bigtransfer pretrain",
                    pretrain_step=str(step), **extra)
    print(json.dumps({"out": args.out, "step": step, "classes": len(model.labels)}))


if __name__ == "__main__":
    main()
