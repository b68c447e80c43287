"""The labelling app: humans rank completions in a browser; the store keeps every label safe.

No torch or transformers anywhere in this package: ``alignloop label serve`` starts in well
under a second. ``store`` is the Python API (projects, import, invite, assignment, submit,
progress, ``load_labels``); ``app`` is the FastAPI web app (pages + JSON API under ``/api``);
``simulate`` drives the app with the embedded world's simulated labellers.
"""
