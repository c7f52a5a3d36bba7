#!/bin/bash
# The fifth self-check measurement (docs/research/repair-self-check.md, "Fifth measurement"): the anchored patch,
# its try and the try's re-check (research/patch_spot_probe.py --recheck) on each cell's two repairs, by
# research/probe_queue.sh. One thread; from the project root with its environment active:
#   bash research/tried_test_queue.sh cifar10-plaincnn-badnets-p10-r10 ...
exec bash "$(dirname "$0")/probe_queue.sh" tried-test --recheck "$@"
