"""`+launcher=packed`: a multirun's jobs trained as packs of one vectorized model (fcexp.pack)."""
