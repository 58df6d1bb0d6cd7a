"""Run by tests/test_distributed.py, once alone and once under torchrun: prune the tiny Llama with a whole-model
recipe (q/k by the method with sampled refit steps, the rest by SparseGPT) on the fixed calibration, save it.

Usage: python distributed_prune.py OUT FORMAT [RANK [SIGNAL]]; RANK dies by SIGKILL (or stops answering, by
SIGSTOP) while pruning layer 1.
"""

import os
import signal
import sys

from tiny_models import WHOLE_MODEL, calibration, tiny_model

from attnprune_opt import AttentionPruner
from attnprune_opt.pipeline import layerwise


def main() -> None:
    out, format = sys.argv[1], sys.argv[2]
    if len(sys.argv) > 3 and os.environ.get("RANK") == sys.argv[3]:
        prune_layer = layerwise._prune_layer
        fault = signal.Signals[sys.argv[4]] if len(sys.argv) > 4 else signal.SIGKILL

        def dying(adapter, index, *args):
            if index == 1:
                os.kill(os.getpid(), fault)
            return prune_layer(adapter, index, *args)

        layerwise._prune_layer = dying
    model = tiny_model("llama")
    pruner = AttentionPruner(**WHOLE_MODEL)
    pruner.prune_model(model, calibration=calibration(), progress=False)
    pruner.save(model, out, format=format)


if __name__ == "__main__":
    main()
