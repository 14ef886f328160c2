"""Models in and out: building, importing, trimming, serving."""
