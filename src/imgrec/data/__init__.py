"""Data sets, image decoding, batch transforms and loaders. Never imports a model or the engine."""
