"""tools/pack_script.py: the packed copy holds train_gpt.py byte for byte, is refused when damaged or foreign, and
(in test_end_to_end.py) trains, exports and scores as the script does."""

import base64
import hashlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train_gpt.py"
spec = importlib.util.spec_from_file_location("pack_script", ROOT / "tools" / "pack_script.py")
pack_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pack_script)


def test_the_copy_holds_the_script_byte_for_byte_in_fewer_bytes_and_packing_is_deterministic():
    source = SCRIPT.read_bytes()
    packed = pack_script.pack(source)
    assert pack_script.unpack(packed) == source
    assert len(packed) < len(source) // 2  # what it is for: the script compresses about 3:1
    assert pack_script.pack(source) == packed
    packed.decode("ascii")  # plain ASCII: any reader of the log or the file sees it as written
    header = packed.split(b"\n", 1)[0].decode()
    assert hashlib.sha256(source).hexdigest() in header and f"({len(source)} bytes)" in header


def test_a_damaged_or_foreign_copy_is_refused_by_name():
    source = SCRIPT.read_bytes()
    packed = pack_script.pack(source)
    with pytest.raises(ValueError, match="x.py is not a copy written by tools/pack_script.py"):
        pack_script.unpack(source, "x.py")
    # one character of the payload changed: it decodes to other bytes or not at all, and either way is refused
    at = packed.index(b'b85decode(b"') + len(b'b85decode(b"') + 5000
    alphabet = base64.b85encode(bytes(range(256)))
    other = next(c for c in alphabet if c != packed[at])
    damaged = packed[:at] + bytes([other]) + packed[at + 1:]
    with pytest.raises(ValueError, match="damaged|does not match the sha256"):
        pack_script.unpack(damaged, "y.py")
    # the header's hash of another source
    forged = packed.replace(hashlib.sha256(source).hexdigest().encode(), b"0" * 64, 1)
    with pytest.raises(ValueError, match="does not match the sha256 and size in its header"):
        pack_script.unpack(forged, "z.py")


@pytest.mark.parametrize("change", [
    (b'exec(compile(s, f, "exec"))\n', b'print("not the source")\n'),           # runs something else
    (b'import base64, linecache, lzma\n', b'import base64, linecache, lzma, os\n'),  # ... a line before it
    (b'exec(compile(s, f, "exec"))\n', b'exec(compile(s, f, "exec"))\nimport os\n'),  # a line after it
])
def test_a_copy_whose_other_lines_were_changed_is_refused(change):
    """The payload decoding to the source says nothing about what the file does with it: every other byte must be
    what pack_script.py writes."""
    packed = pack_script.pack(SCRIPT.read_bytes())
    old, new = change
    assert old in packed
    with pytest.raises(ValueError, match="its other lines are not the ones pack_script.py writes|not a copy written"):
        pack_script.unpack(packed.replace(old, new, 1), "forged.py")


def test_check_accepts_the_copy_and_names_a_copy_of_another_source(tmp_path, capsys):
    out = tmp_path / "build" / "train_gpt.py"
    assert pack_script.main(["--out", str(out)]) == 0
    assert pack_script.main(["--check", str(out)]) == 0
    assert f"runs {SCRIPT}" in capsys.readouterr().out
    other = tmp_path / "other.py"
    other.write_text("print('another script')\n")
    with pytest.raises(SystemExit, match=f"{out} holds another source than {other}"):
        pack_script.main(["--src", str(other), "--check", str(out)])
    with pytest.raises(SystemExit, match="is not a copy written by tools/pack_script.py"):
        pack_script.main(["--check", str(other)])


def test_a_script_that_does_not_compile_is_not_packed_and_an_earlier_copy_stays(tmp_path):
    out = tmp_path / "train_gpt.py"
    out.write_bytes(b"an earlier copy")
    broken = tmp_path / "broken.py"
    broken.write_text("def main(:\n")
    with pytest.raises(SystemExit, match="broken.py cannot be packed"):
        pack_script.main(["--src", str(broken), "--out", str(out)])
    assert out.read_bytes() == b"an earlier copy" and not list(tmp_path.glob("*.tmp*"))
    with pytest.raises(SystemExit, match="is not a file"):
        pack_script.main(["--src", str(tmp_path / "missing.py"), "--out", str(out)])
