"""The catalog remembers a model file that passed its package's check, by size and mtime."""
import os

from ktjax.models import catalog


def test_a_checked_file_is_remembered_until_it_changes(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    assert not catalog._passed_before(path, "abc")
    catalog._remember_passed(path, "abc")
    assert catalog._passed_before(path, "abc")
    assert not catalog._passed_before(path, "another digest")
    with open(path, "ab") as fh:          # appended to: another size
        fh.write(b"x")
    assert not catalog._passed_before(path, "abc")
    catalog._remember_passed(path, "abc")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))   # rewritten in place
    assert not catalog._passed_before(path, "abc")
    path.unlink()
    assert not catalog._passed_before(path, "abc")
