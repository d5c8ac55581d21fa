"""The daemon's loop with a set file (in-process, the fake kernel): an edit writes elements only.

The ``SetFiles`` source's inotify is the kernel tier's and the end-to-end
tests' business; here the reload it asks for is made by hand, as a source would.
"""

from __future__ import annotations

from pathlib import Path

from test_daemon_loop import Harness, config_text, drive

from markrouted.model import NftUpdate

SETS = """\
[[policy]]
name = "video"
daddr = ["@video"]
uplinks = ["wan2"]

[sets.video]
files = ["{path}"]
"""


def _nft_writes(h: Harness) -> list[NftUpdate]:
    return [obj for op, obj in h.kernel.writes if op == "nft_apply" and isinstance(obj, NftUpdate)]


def test_a_set_file_edit_is_one_elements_update_and_a_bad_one_keeps_the_old(tmp_path: Path) -> None:
    set_file = tmp_path / "video.txt"
    set_file.write_text("198.18.0.0/24\n198.18.5.0/24\n")
    text = config_text(policies=SETS.format(path=set_file))

    async def body(h: Harness) -> None:
        before = len(_nft_writes(h))
        assert h.kernel.nft is not None
        set_file.write_text("198.18.0.0/24\n198.18.9.0/24\n")
        h.daemon.reload("set file changed")
        await h.settled()
        writes = _nft_writes(h)[before:]
        assert len(writes) == 1 and not writes[0].replace and not writes[0].chains, writes
        (change,) = writes[0].elements
        assert change.name == "video_v4" and len(change.delete) == 1 and len(change.add) == 1
        video = h.kernel.nft.set("video_v4")
        assert video is not None and len(video.elements) == 2
        assert h.status()["sets"]["video_v4"]["elements"] == 2

        # a malformed line: the reload is refused, the set keeps its last good elements
        set_file.write_text("198.18.0.0/24\nnot-an-address\n")
        h.daemon.reload("set file changed")
        await h.settled()
        assert len(_nft_writes(h)) == before + 1
        refused = h.log.named("config reload refused")
        assert refused and f"{set_file}:2" in refused[-1]["error"]
        assert h.kernel.nft.set("video_v4") == video

    drive(tmp_path, body, text=text)
