"""sam-fast-serve, the command: the model archive, checkpoints, random weights, waiting for a
server, sample images."""
