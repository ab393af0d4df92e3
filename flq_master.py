#!/usr/bin/env python3
"""The original entry point: ``python flq_master.py --config flq_config.json [--verbose]``
(same as ``flq master ...``). Under a Python that cannot run FLQ-Fed it says so
in one line and exits 2 (flq_entry.py; old Pythons can read both files).
"""

import flq_entry

if __name__ == "__main__":
    raise SystemExit(flq_entry.run("flq_master.py"))
