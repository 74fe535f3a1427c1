"""Built-in transforms, registered through the `stratlm` entry-point group."""

from stratlm.core.hookspecs import hookimpl

TRANSFORMS: dict = {}


@hookimpl
def register_transforms(register):
    for name, transform in TRANSFORMS.items():
        register(name, transform)
