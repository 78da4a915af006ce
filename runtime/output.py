"""Output and arguments shared by the two command-line tools (`hostd-runtime` and `hostctl`).

Standard library only, and quick to import: hostctl starts through it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: hostctl --help stays quick
if TYPE_CHECKING:
    from typing import Any


def add_image_commands(img: Any) -> None:
    """`image build|import|list|remove` and their arguments (`img`: a subparsers action)."""
    b = img.add_parser(
        "build", help="build an image from its recipe (debootstrap); no NAME: list the recipes"
    )
    b.add_argument("name", nargs="?", help="image to build, e.g. default, debian12")
    b.add_argument("--recipe", help="recipe directory name (default: the image name)")
    i = img.add_parser("import", help="import a root filesystem tarball")
    i.add_argument("name")
    i.add_argument("tarball", help="a file (read by the caller)")
    img.add_parser("list")
    r = img.add_parser("remove")
    r.add_argument("name")


def print_json(data: object) -> None:
    import json  # not loaded for --help

    print(json.dumps(data, indent=1))


def print_table(
    as_json: bool, data: object, head: Sequence[str], rows: Sequence[Sequence[str]]
) -> None:
    """Aligned columns for people, or `data` as JSON with --json."""
    if as_json:
        print_json(data)
        return
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def print_recipes(as_json: bool, recipes: list[dict[str, Any]]) -> None:
    """The recipes `image build NAME` can build, and which are built."""
    print_table(
        as_json,
        recipes,
        ("RECIPE", "DESCRIPTION", "BUILT"),
        [
            (
                r["recipe"],
                (f"= {r['alias_of']}: " if r["alias_of"] else "") + r["description"],
                r["built"] or "-",
            )
            for r in recipes
        ],
    )
    if not as_json:
        print("build one with: image build NAME", file=sys.stderr)
