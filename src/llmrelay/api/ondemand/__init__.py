"""Models on demand at the API server: declared models read from the hosts' table entries,
one load per model however many requests ask (loads.py), and the middleware that holds a
request until its model is loaded (middleware.py). See docs/on-demand.md."""
