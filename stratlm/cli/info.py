"""stratlm info (being written)."""


def add_parser(sub):
    p = sub.add_parser("info", help="(not yet implemented)")
    p.set_defaults(run=lambda args: print("not yet implemented") or 1)
