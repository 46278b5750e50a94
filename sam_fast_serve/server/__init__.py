"""The mask service: decode -> predict -> encode (service.py), the config, metrics and embedding
store, and the TorchServe handler (handler.py, the only module that imports ts). It reaches a model
through models.registry and models.engine only."""
