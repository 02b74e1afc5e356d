"""`imgrec serve`: a local web page and JSON API to try a trained model (FastAPI + uvicorn, the `serve` extra).

  card.py    the model card: what the weights file and its run folder say about the model (standard library only)
  limits.py  the upload limit, as ASGI middleware: 413 before a too-large body is read
  app.py     create_app: the routes (/, /api/predict, /api/model, /healthz), error statuses, bounded inference
  server.py  serve(): checks, threads, the host warning, uvicorn
  static/index.html  the one self-contained page (served from the package, never from a client-named path)

Only the CLI imports this package; it uses imgrec.inference (Predictor) and the one image decoder
(data.imageio), never the workflows or the CLI. Nothing here is imported by `import imgrec`.
"""
