"""What the client and the server share, torch free: errors and their HTTP statuses, the wire
formats, mask records, the AMG and image options with their checks, prompts, TIFF reading and
intensity scaling, the endpoint (URLs, token files)."""
