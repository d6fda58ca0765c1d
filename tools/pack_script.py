"""Pack train_gpt.py into a smaller copy that runs exactly its source, for the counted code bytes.

The challenge counts the bytes of the script that trains and scores the model against the same 16,000,000 as the
compressed weights. The readable `train_gpt.py` stays the only source; this tool writes a copy of it that holds
that source, byte for byte, compressed (xz, preset 9 extreme) and base85-encoded, and runs it with `exec` under the
name `<train_gpt.py>` (registered with linecache, so tracebacks and `inspect` show the real lines). Run the copy
exactly as the original (`torchrun ... build/train_gpt.py`): it reads the same settings, and since the script
counts the bytes of the file it runs (`code_bytes`) and logs that file at the head of its log, the copy's run
counts and logs the copy, and the clip fit gives the bytes it saves to the matrices.

    python3 tools/pack_script.py                        # train_gpt.py -> build/train_gpt.py, sizes and sha256
    python3 tools/pack_script.py --check build/train_gpt.py   # is this file the packing of train_gpt.py?

`--check` unpacks the file and compares the source it holds with `--src`, so it works on a copy packed elsewhere
(xz's output can differ between library versions; the source it decodes to cannot), and requires every other byte
of the file to be what this tool writes around that payload (the lines that run it included). The copy's first lines name
the source's sha256 and size. Packing is deterministic for one xz library: the same source, the same bytes.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import lzma
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402  (write_atomically)

XZ_PRESET = 9 | lzma.PRESET_EXTREME
HEADER = "# train_gpt.py packed by tools/pack_script.py: source sha256 {sha} ({size} bytes)\n"
BODY = ('import base64, linecache, lzma\n'
        's = lzma.decompress(base64.b85decode(b"{payload}")).decode()\n'
        'f = "<train_gpt.py>"\n'
        'linecache.cache[f] = (len(s), None, s.splitlines(True), f)\n'
        'exec(compile(s, f, "exec"))\n')
PACKED = re.compile(r'^# train_gpt\.py packed by tools/pack_script\.py: source sha256 ([0-9a-f]{64}) \((\d+) bytes\)\n'
                    r'import base64, linecache, lzma\n'
                    r's = lzma\.decompress\(base64\.b85decode\(b"([^"]*)"\)\)\.decode\(\)\n')


def pack(source: bytes) -> bytes:
    """The packed copy of `source` (a UTF-8 Python script that must compile)."""
    text = source.decode("utf-8")  # the copy decodes it as UTF-8: refuse here what would fail there
    compile(text, "<train_gpt.py>", "exec")
    payload = base64.b85encode(lzma.compress(source, preset=XZ_PRESET)).decode("ascii")
    header = HEADER.format(sha=hashlib.sha256(source).hexdigest(), size=len(source))
    return (header + BODY.format(payload=payload)).encode("ascii")


def unpack(packed: bytes, name: str = "the file") -> bytes:
    """The source a packed copy holds, checked against the sha256 and size its header names."""
    m = PACKED.match(packed.decode("ascii", errors="replace"))
    if not m:
        raise ValueError(f"{name} is not a copy written by tools/pack_script.py (its first lines do not match)")
    try:
        source = lzma.decompress(base64.b85decode(m.group(3)))
    except (ValueError, lzma.LZMAError) as e:
        raise ValueError(f"{name}: its packed source does not decode ({e}): the file is damaged") from e
    if hashlib.sha256(source).hexdigest() != m.group(1) or len(source) != int(m.group(2)):
        raise ValueError(f"{name}: its packed source does not match the sha256 and size in its header")
    expected = (HEADER.format(sha=m.group(1), size=m.group(2)) + BODY.format(payload=m.group(3))).encode("ascii")
    if packed != expected:  # what runs the source is the lines after the payload: any change there runs other code
        raise ValueError(f"{name} holds the source, but its other lines are not the ones pack_script.py writes "
                         "(the code that runs it was changed, or lines were added): it may not run that source")
    return source


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, default=ROOT / "train_gpt.py", help="the readable script (train_gpt.py)")
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "train_gpt.py", help="where the copy goes")
    ap.add_argument("--check", type=Path, metavar="FILE", help="check FILE against --src instead of writing")
    args = ap.parse_args(argv)
    if not args.src.is_file():
        raise SystemExit(f"--src {args.src} is not a file")
    source = args.src.read_bytes()
    if args.check:
        if not args.check.is_file():
            raise SystemExit(f"--check {args.check} is not a file")
        try:
            held = unpack(args.check.read_bytes(), str(args.check))
        except ValueError as e:
            raise SystemExit(str(e)) from None
        if held != source:
            raise SystemExit(f"{args.check} holds another source than {args.src} "
                             f"(sha256 {hashlib.sha256(held).hexdigest()[:12]}…, {len(held):,} bytes, against "
                             f"{hashlib.sha256(source).hexdigest()[:12]}…, {len(source):,} bytes)")
        print(f"{args.check} ({args.check.stat().st_size:,} bytes) runs {args.src} "
              f"({len(source):,} bytes, sha256 {hashlib.sha256(source).hexdigest()})")
        return 0
    try:
        packed = pack(source)
    except (UnicodeDecodeError, SyntaxError) as e:
        raise SystemExit(f"{args.src} cannot be packed: {e}") from None
    if unpack(packed) != source:  # never write a copy that would run something else
        raise SystemExit("the packed copy does not decode to the source: not written")
    tg.write_atomically(args.out, lambda f: f.write(packed))
    print(f"{args.src} ({len(source):,} bytes) -> {args.out} ({len(packed):,} bytes, "
          f"{len(source) - len(packed):,} fewer counted bytes); source sha256 {hashlib.sha256(source).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
