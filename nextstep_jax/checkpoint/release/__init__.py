"""The official PyTorch release: its config.json, its folders and its weight formats (safetensors, and
``torch.save`` pickles read without torch), read and written."""
