"""What `lpnet serve` does on a fresh machine so that `make run` alone gives a working service.

- `keys`: the first admin key, created and printed once when the database has no active one, and
  ``LPNET_ADMIN_KEY`` made an active admin key when it is set.
- `bootstrap`: this machine's CPU registered as the local device, then one background job that
  profiles it within a time budget and fits its first predictor; resumed by the next start if the
  server stops halfway, skipped once the device has a predictor.
"""
