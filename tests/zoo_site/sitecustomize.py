"""Makes the registry's torchvision importable beside the CPU torch, for the model-zoo tests only.

The registry's torchvision 0.28.0 is built against the CUDA torch: registering its C++ ops' fake
kernels fails beside `torch 2.13.0+cpu` (`operator torchvision::nms does not exist`), and once it
is importable transformers stops importing `BertModel`. So scripts/setup.sh installs it (and timm)
into `.venv/zoo`, off the default path, and only processes that put this folder and `.venv/zoo` on
PYTHONPATH (tests/zoo.py does it for its own subprocesses) see it, with the two registration
modules stubbed: the Python model definitions need none of the C++ ops.
"""

import sys
import types

for _name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
    sys.modules.setdefault(_name, types.ModuleType(_name))
