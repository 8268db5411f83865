"""The agents of remote devices: their tasks, which keys may act on them, and plan verification."""
