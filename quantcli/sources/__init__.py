"""Models by source (a Hugging Face folder, a torchvision or timm architecture) and their preprocessing.

`names` is the torch-free registry the recipe schema reads; the loaders import torch, transformers,
torchvision and timm inside their functions, so `quantcli --help` and `validate` stay instant.
"""
