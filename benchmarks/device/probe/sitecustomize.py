"""Started with every Python process of a GPU-session part when ``--as-node`` put this folder on PYTHONPATH: the
process imports like the air-gapped GPU node (``benchmarks.device.wheelhouse.NodeImage``): a module that neither the
node's image nor the wheelhouse provides cannot be imported."""

import os

if os.environ.get("FAR_SCALE_AS_NODE"):
    from benchmarks.device.wheelhouse import NodeImage

    NodeImage().install()
