"""Sources are adapters: they hand out batches with a typed position and never stitch."""
