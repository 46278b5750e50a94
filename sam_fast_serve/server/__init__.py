"""The mask service: decode -> predict -> encode (service.py), the config, metrics and embedding
store, and the TorchServe handler (handler.py, the only module that imports ts). It reaches a model
through models.registry (which family) and models.engine (the engine); of the rest of models/ it
uses the embedding store, precision, checkpoints and the stage names."""
