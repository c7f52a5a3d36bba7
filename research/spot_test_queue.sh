#!/bin/bash
# The fourth self-check measurement (docs/research/repair-self-check.md, "Fourth measurement"): the anchored patch
# (research/patch_spot_probe.py) and its try on each cell's two repairs, by research/probe_queue.sh. One thread;
# from the project root with its environment active:
#   bash research/spot_test_queue.sh mnist-lenet-badnets-p10-r6 ...
exec bash "$(dirname "$0")/probe_queue.sh" spot-test "" "$@"
