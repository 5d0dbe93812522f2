"""Parsing of layer lists such as ``0-11``, ``0,3,5-7`` or ``all``."""

from lensio.errors import BadInputError

_SPEC_HELP = "use a list such as '0-11', '0,3,5-7' or 'all'"


def parse_layers(spec: str, n_layers: int | None) -> tuple[int, ...]:
    """Parse a layer spec into sorted, distinct layer indices in ``[0, n_layers)``.

    With ``n_layers`` None only the syntax is checked (before a model is loaded), and ``all`` gives ().

    Raises:
        BadInputError: the spec is malformed (``5-2``, ``a``, ``1,,2``, empty) or names a layer
            outside the model.
    """
    text = spec.strip()
    if not text:
        raise BadInputError(f"invalid layer spec {spec!r}: it is empty; {_SPEC_HELP}")
    if text.lower() == "all":
        return tuple(range(n_layers or 0))

    layers: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise BadInputError(f"invalid layer spec {spec!r}: it has an empty item; {_SPEC_HELP}")
        bounds = part.split("-")
        # isascii: str.isdigit also accepts characters such as '²' that int() rejects.
        if len(bounds) > 2 or not all(b.strip().isascii() and b.strip().isdigit() for b in bounds):
            raise BadInputError(f"invalid layer spec {spec!r}: item {part!r} is not a layer or a range; {_SPEC_HELP}")
        first, last = int(bounds[0]), int(bounds[-1])
        if last < first:
            raise BadInputError(f"invalid layer spec {spec!r}: range {part!r} runs backwards; write it as '{last}-{first}'")
        layers.update(range(first, last + 1))

    out_of_range = sorted(layer for layer in layers if n_layers is not None and layer >= n_layers)
    if out_of_range:
        raise BadInputError(
            f"layer {out_of_range[0]} is out of range: the model has {n_layers} layers (0-{n_layers - 1})"
        )
    return tuple(sorted(layers))
