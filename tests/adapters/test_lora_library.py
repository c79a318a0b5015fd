import json
import os
import struct
import time
from pathlib import Path

import pytest

from wangend.adapters.lora import (
    LoraHeaderError,
    LoRALibrary,
    LoraLookupError,
    family_folders,
    read_header,
    size_hint,
)

from .fifo import without_hanging
from .lora_files import RANK, write_lora


def age(path: Path, seconds: float = 60.0) -> None:
    """Backdate a folder, as if it had been written a minute ago (outside the racy window)."""
    past = time.time() - seconds
    os.utime(path, (past, past))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "loras" / "wan_1.3B"
    (folder / "style").mkdir(parents=True)
    write_lora(folder / "peft.safetensors", "diffusers", seed=1)
    write_lora(folder / "style" / "anime.sft", "wan", seed=2)
    write_lora(folder / "kohya.safetensors", "kohya", seed=3)
    (folder / "notes.txt").write_text("not a LoRA")
    (folder / "broken.safetensors").write_bytes(b"\x0a\x00\x00\x00\x00\x00\x00\x00{not json}")
    age(folder / "style")
    age(folder)
    return tmp_path / "loras"


def test_family_mapping() -> None:
    assert family_folders("wan2.1-t2v", "1.3B") == ("wan_1.3B",)
    assert family_folders("wan2.1-t2v", "14B") == ("wan",)
    assert family_folders("wan2.1-t2v") == ("wan",)
    assert family_folders("wan2.1-i2v", "14B") == ("wan_i2v",)
    assert family_folders("wan2.2-t2v", "14B") == ("wan2_2", "wan")
    assert family_folders("wan2.2-ti2v", "5B") == ("wan_5B",)
    assert family_folders("wan2.1-t2v", "tiny") == ("wan_tiny",)
    with pytest.raises(LoraLookupError):
        family_folders("../etc")
    assert size_hint("wan2.1-t2v-1.3b") == "1.3B"
    assert size_hint("Wan-AI/Wan2.2-T2V-A14B-Diffusers") == "14B"
    assert size_hint("tiny") == "tiny" and size_hint("my-model") is None


def test_list_reads_headers(root: Path) -> None:
    library = LoRALibrary([root])
    infos = {info.name: info for info in library.list("wan2.1-t2v", size="1.3B")}
    assert sorted(infos) == ["broken", "kohya", "peft", "style/anime"]
    assert infos["peft"].format == "diffusers" and infos["peft"].rank == RANK
    assert infos["style/anime"].format == "wan"
    assert infos["kohya"].format == "kohya" and infos["kohya"].rank == RANK
    assert infos["broken"].error and "not JSON" in infos["broken"].error
    assert library.list("wan2.1-t2v", size="14B") == []  # other family folder: empty


def test_second_scan_is_a_cache_hit_and_a_new_file_is_noticed(root: Path) -> None:
    library = LoRALibrary([root])
    library.list("wan2.1-t2v", size="1.3B")
    walks, reads = library.stats["walks"], library.stats["header_reads"]
    library.list("wan2.1-t2v", size="1.3B")
    library.find("peft", "wan2.1-t2v", size="1.3B")
    assert library.stats["walks"] == walks  # nothing walked again
    assert library.stats["header_reads"] == reads  # no header read again
    write_lora(root / "wan_1.3B" / "style" / "new.safetensors", "diffusers", seed=9)
    names = [info.name for info in library.list("wan2.1-t2v", size="1.3B")]
    assert "style/new" in names
    assert library.stats["walks"] > walks


def test_a_folder_created_later_is_noticed(tmp_path: Path) -> None:
    library = LoRALibrary([tmp_path])
    assert library.list("wan2.1-i2v") == []
    write_lora((tmp_path / "wan_i2v").mkdir() or tmp_path / "wan_i2v" / "a.safetensors", "wan", 1)
    assert [info.name for info in library.list("wan2.1-i2v")] == ["a"]


def test_find(root: Path) -> None:
    library = LoRALibrary([root])
    expected = root / "wan_1.3B" / "style" / "anime.sft"
    assert library.find("style/anime", "wan2.1-t2v", "1.3B") == expected
    assert library.find("style/anime.sft", "wan2.1-t2v", "1.3B") == expected
    with pytest.raises(LoraLookupError, match="no LoRA named 'nope'"):
        library.find("nope", "wan2.1-t2v", "1.3B")
    for bad in ("../wan_1.3B/peft", "/etc/passwd", "style/../../x", "C:/x"):
        with pytest.raises(LoraLookupError, match="inside the LoRA folder"):
            library.find(bad, "wan2.1-t2v", "1.3B")


def test_symlink_out_of_the_folder_is_refused(root: Path, tmp_path: Path) -> None:
    outside = write_lora(tmp_path / "outside.safetensors", "diffusers", seed=5)
    (root / "wan_1.3B" / "link.safetensors").symlink_to(outside)
    with pytest.raises(LoraLookupError, match="outside"):
        LoRALibrary([root]).find("link", "wan2.1-t2v", "1.3B")


def test_sha256_is_cached_by_size_and_mtime(root: Path) -> None:
    import hashlib

    library = LoRALibrary([root])
    path = root / "wan_1.3B" / "peft.safetensors"
    digest = library.sha256(path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert library.sha256(path) == digest and library.stats["hashes"] == 1
    write_lora(path, "diffusers", seed=11)
    assert library.sha256(path) != digest and library.stats["hashes"] == 2


def test_header_errors(tmp_path: Path) -> None:
    good = write_lora(tmp_path / "good.safetensors", "diffusers", seed=1)
    assert len(read_header(good)) > 0
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(LoraHeaderError, match="truncated"):
        read_header(truncated)
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    with pytest.raises(LoraHeaderError, match="too short"):
        read_header(short)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(LoraHeaderError, match="no valid"):
        read_header(huge)
    bad_entry = tmp_path / "bad_entry.safetensors"
    header = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": "nope"}}).encode()
    bad_entry.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(LoraHeaderError, match="malformed"):
        read_header(bad_entry)


def test_only_regular_files_are_loras_and_a_named_pipe_is_never_opened(root: Path) -> None:
    folder = root / "wan_1.3B"
    pipe = folder / "pipe.safetensors"
    os.mkfifo(pipe)  # what once held `loras`, `validate` and `enqueue` for every client
    library = LoRALibrary([root])
    infos = without_hanging(lambda: library.list("wan2.1-t2v", size="1.3B"), [pipe])
    assert [info.name for info in infos] == ["broken", "kohya", "peft", "style/anime"]
    # a device behind a link, a link to nothing: not LoRAs either, and no error
    (folder / "zero.safetensors").symlink_to("/dev/zero")
    (folder / "gone.safetensors").symlink_to(folder / "nowhere.safetensors")
    infos = without_hanging(lambda: library.list("wan2.1-t2v", size="1.3B"), [pipe])
    assert [info.name for info in infos] == ["broken", "kohya", "peft", "style/anime"]
    with pytest.raises(LoraLookupError, match="no LoRA named 'pipe'"):
        without_hanging(lambda: library.find("pipe", "wan2.1-t2v", "1.3B"), [pipe])
    # asked about by path, it is described, still without being opened
    info = without_hanging(lambda: library.info(pipe), [pipe])
    assert info.error == "pipe.safetensors is a named pipe (FIFO), not a regular file"
    with pytest.raises(LoraHeaderError, match="named pipe"):
        without_hanging(lambda: read_header(pipe), [pipe])
    with pytest.raises(OSError, match="named pipe"):
        without_hanging(lambda: library.sha256(pipe), [pipe])
