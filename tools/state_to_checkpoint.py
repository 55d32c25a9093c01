"""Turn a pre-training run's resumable state (RUN/state.pt) into a shippable checkpoint.

Used for BiT-Mini, whose shipped weights are a snapshot taken before its schedule ended:
    python tools/state_to_checkpoint.py RUN/state.pt CORPUS/train OUT.safetensors --arch R26x0.5 --fp16
"""

from __future__ import annotations

import argparse
import json

import torch

from bigtransfer.checkpoints import load_state, save_checkpoint
from bigtransfer.models import ResNetV2
from bigtransfer.runstate import read_run_state
from bigtransfer.shards import read_index


def main() -> None:
    """Read the state, attach the corpus's class names, write safetensors with metadata."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("state")
    p.add_argument("shards", help="the shard folder the run trained on (its index.json names the classes)")
    p.add_argument("out")
    p.add_argument("--arch", required=True)
    p.add_argument("--fp16", action="store_true")
    args = p.parse_args()
    payload = read_run_state(args.state)  # torch's restricted unpickler: the file runs no code
    state = {k.removeprefix("module."): v for k, v in payload["model"].items()}
    classes = read_index(args.shards).classes
    model = ResNetV2(args.arch, len(classes))
    load_state(model, state, args.state)
    model.labels = list(classes)
    save_checkpoint(model, args.out, dtype=torch.float16 if args.fp16 else None, source="bigtransfer pretrain",
                    pretrain_step=str(payload["step"]))
    print(json.dumps({"out": args.out, "step": payload["step"], "classes": len(classes)}))


if __name__ == "__main__":
    main()
