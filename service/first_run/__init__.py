"""What `lpnet serve` does on a fresh machine so that `make run` alone gives a working service.

- `keys`: the first admin key, created and printed once when the database has no active one, and
  ``LPNET_ADMIN_KEY`` made an active admin key when it is set.
- `bootstrap`: this machine's CPU registered as the local device, then one background job that
  profiles it within a time budget and fits its first predictor; resumed by the next start if the
  server stops halfway, skipped once the device has a predictor.
- `refine`: once the device is ready, rounds of profiling where its newest predictor is least sure,
  each storing the next predictor version; resumed by the next start until the last round is done.
- `local_profile`: what these jobs are given and how they profile this machine; `progress`: their
  percent and ETA in the device's status.
"""
