#!/usr/bin/env python
"""Open a compare.html in headless Chromium (the system package) and save a screenshot, to look at the layout.

    python bench/screenshot_compare.py outputs/compare/smollm2-135m-instruct_vs_demo/compare.html \
        --output docs/img/compare.png --width 1280 --height 1100
    python bench/screenshot_compare.py .../compare.html --fragment "outcome=B&kind=format_json"   # filtered view

Outside the test suite: it needs `chromium` (apt-get install -y chromium). Chromium loads the file with
networking blocked (--host-resolver-rules): a page that needed a CDN would show up broken in the picture.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("no Chromium found: install it with `apt-get install -y chromium`")


def screenshot(html: Path, output: Path, width: int, height: int, fragment: str = "") -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        command = [find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                   f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND",
                   f"--window-size={width},{height}", f"--screenshot={output.resolve()}",
                   "--virtual-time-budget=2000", html.resolve().as_uri() + (f"#{fragment}" if fragment else "")]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode != 0 or not output.is_file():
        raise SystemExit(f"chromium failed ({result.returncode}):\n{result.stderr[-2000:]}")
    print(f"{output} ({os.path.getsize(output) // 1024} KB)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path)
    parser.add_argument("--output", type=Path, default=Path("bench/out/compare.png"))
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1800)
    parser.add_argument("--fragment", default="", help="URL fragment with filters, e.g. outcome=B&kind=identity")
    args = parser.parse_args(argv)
    if not args.html.is_file():
        raise SystemExit(f"{args.html}: no such file; run `python hf_sft_eval.py compare A B --prompts FILE` first")
    screenshot(args.html, args.output, args.width, args.height, args.fragment)
    return 0


if __name__ == "__main__":
    sys.exit(main())
