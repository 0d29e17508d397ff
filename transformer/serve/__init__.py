"""Serving trained models over HTTP: a JSON API, a page that shows the model at work, and metrics.

`transformer-serve` (`transformer.commands.serve`) loads the models as the decoding commands do and
runs `app.create_app` under uvicorn. Routes (`app.py`) turn JSON into the commands' decode settings
(`requests.py` checks the bodies) and hand the work to one thread that runs every model call, in
batches (`batcher.py`); `metrics.py` counts it all for Prometheus. The page (`static/`) is plain
HTML, CSS and JavaScript that call the JSON API: nothing in it knows the model, and nothing in the
model knows the web.
"""
