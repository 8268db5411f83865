"""Latency measurement for lpnet: backends, timing protocol, samplers, sinks and the run loop.

Import from the modules (`profiler.backends`, `profiler.protocol`, ...): the package itself imports
nothing, so light modules such as `profiler.agent.cli` load without torch.
"""
