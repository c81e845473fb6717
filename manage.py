#!/usr/bin/env python
import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "workbench.settings")
    if sys.argv[1:2] in (["run"], ["demo"]):
        # The one-machine start keeps a generated key in the data dir (settings refuses to run without one).
        os.environ.setdefault("WORKBENCH_LOCAL_SECRET_KEY", "true")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
