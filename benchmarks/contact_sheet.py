"""Contact-sheet render time with long captions (bot.contact_sheet.render_sheet).

    .venv/bin/python benchmarks/contact_sheet.py [--tiles 25] [--chars 500] [--against REV]

`--against REV` also times bot/contact_sheet.py as it was at git revision REV, in the same run
(a ratio on the CPU is what is worth quoting). Prints the numbers and a JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from bot import contact_sheet  # noqa: E402


def tiles(n: int, chars: int) -> list[tuple[bytes, str]]:
    buf = io.BytesIO()
    Image.new("RGB", (256, 256), (90, 120, 200)).save(buf, format="PNG")
    caption = ("a red house by the sea, " * (chars // 24 + 1))[:chars]
    return [(buf.getvalue(), f"{i}: {caption}") for i in range(n)]


def seconds(module, sheet: list[tuple[bytes, str]]) -> float:
    start = time.perf_counter()
    module.render_sheet(sheet)
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiles", type=int, default=25)
    p.add_argument("--chars", type=int, default=500)
    p.add_argument("--against", metavar="REV", help="also time bot/contact_sheet.py at this git revision")
    args = p.parse_args()
    sheet = tiles(args.tiles, args.chars)
    result = {"tiles": args.tiles, "chars": args.chars, "seconds": seconds(contact_sheet, sheet)}
    print(f"now: {result['seconds']:.3f} s for {args.tiles} tiles with {args.chars}-character captions")
    if args.against:
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{args.against}:bot/contact_sheet.py"],
                                check=True, capture_output=True, text=True).stdout
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "contact_sheet_then.py"
            path.write_text(source)
            spec = importlib.util.spec_from_file_location("contact_sheet_then", path)
            then = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = then   # its dataclasses look their module up
            spec.loader.exec_module(then)
            result["against"], result["seconds_then"] = args.against, seconds(then, sheet)
        result["speedup"] = result["seconds_then"] / result["seconds"]
        print(f"at {args.against}: {result['seconds_then']:.3f} s ({result['speedup']:.0f}x slower)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
