"""The recognition service: logo gate, routing, TF Serving client, fallbacks."""
