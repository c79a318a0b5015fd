"""wangend: a long-lived daemon that queues and runs Wan 2.x video generation.

Importing the package is cheap on purpose: `wangenctl` imports `wangend.protocol`, and
nothing heavy (torch, diffusers) may load on that path.
"""

__version__ = "0.1.0"
