"""What the GPU machine has: CUDA and the device, and which packages bigtransfer's GPU checks import.

Prints one line per package (version, or why it is missing) and what each missing one turns off; exits 0 always,
so `make gpu-check` goes on with what it has. Core dependencies (safetensors, pillow, numpy, tqdm) are imported at
module level by `import bigtransfer`; pytest runs the CUDA tests; transformers and timm are the benchmark's peers.
"""

from __future__ import annotations

import importlib
import sys

# module -> what needs it
NEEDED = {
    "torch": "everything",
    "numpy": "import bigtransfer (core dependency)",
    "PIL": "import bigtransfer (core dependency: image decoding, plots)",
    "safetensors": "import bigtransfer (core dependency: checkpoints)",
    "tqdm": "import bigtransfer (core dependency: progress bars)",
    "pytest": "the CUDA tests",
    "transformers": "the benchmark's HF peer (the benchmark cannot run without it)",
    "timm": "the benchmark's timm peer (skipped without it)",
    "onnx": "the ONNX export test (skipped without it)",
    "onnxruntime": "checking the ONNX export (the export then reports it unchecked)",
}


def probe(name: str) -> str | None:
    """The module's version, or None with the reason printed."""
    try:
        module = importlib.import_module(name)
    except Exception as e:  # timm can fail with errors other than ImportError (a torchvision clash)
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"  MISSING {name:13} ({type(e).__name__}: {first[:120]}) -> needed for: {NEEDED[name]}")
        return None
    version = getattr(module, "__version__", "?")
    print(f"  ok      {name:13} {version}")
    return str(version)


def main() -> int:
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    found = {name: probe(name) for name in NEEDED}
    if found["torch"]:
        import torch

        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            print(f"  CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, devices: {', '.join(names)}, "
                  f"bf16 {torch.cuda.is_bf16_supported()}")
        else:
            print("  no CUDA device: the CUDA tests will skip and the benchmark will refuse")
    try:
        import bigtransfer

        print(f"  ok      bigtransfer   {bigtransfer.__version__} from {bigtransfer.__file__}")
    except Exception as e:
        print(f"  MISSING bigtransfer   ({type(e).__name__}: {e}) -> the CUDA tests and the benchmark cannot run; "
              "run with PYTHONPATH=src and install the missing core dependency (WHEELS=folder, see the Makefile)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
