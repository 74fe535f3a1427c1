"""stratlm chat (being written)."""


def add_parser(sub):
    p = sub.add_parser("chat", help="(not yet implemented)")
    p.set_defaults(run=lambda args: print("not yet implemented") or 1)
