"""The models: registry.py (model_type -> family, official checkpoints), engine.py (the interface
the service talks to), embedding.py (what is cached), precision.py, and one folder per family:
sam1/ (segment_anything) and sam2/ (SAM 2 and 2.1). Nothing here imports server/ or ts."""
