#!/usr/bin/env python3
"""The original entry point: ``python flq_worker.py --worker_id N --master_ip IP``
(same as ``flq worker ...``)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from flq.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["worker", *sys.argv[1:]]))
