"""stratlm generate (being written)."""


def add_parser(sub):
    p = sub.add_parser("generate", help="(not yet implemented)")
    p.set_defaults(run=lambda args: print("not yet implemented") or 1)
